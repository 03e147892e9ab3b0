"""Where a click on a slice view lands on the live session's slices: pure numpy, no Qt, no MRML.

A slice view shows a plane of the world (its SliceToRAS matrix: columns 0 and 1 span the plane,
column 2 is its normal, column 3 a point on it). The live session cuts the volume along one voxel axis
(run/protocol.py: a slice is the (k, j, i) array with the slicing axis taken out; its rows and columns
are the two axes left, in that order; a point [x, y] is column x, row y). A click maps to the session
when the view's plane is one of the volume's own slices along that axis: the view's normal runs along
the axis within ALIGNED_DEGREES. Any other view (an oblique reformat, another orientation) is refused in
one sentence; ``view_axis`` says which voxel axis a view shows, so that a session with no prompts yet
can be opened again on the view's axis instead (click_session.py decides).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..common.errors import InputError
from ..io.slicing import ANATOMICAL_AXES, slicing_axis
from ..io.volume import Volume

ALIGNED_DEGREES = 1.0  # a view within this angle of a voxel axis shows the volume's own slices
AXIS_LETTERS = "kji"  # numpy axis 0, 1, 2 of a (k, j, i) array
PLANES = tuple(ANATOMICAL_AXES)  # sagittal, coronal, axial


@dataclass(frozen=True)
class SlicePoint:
    """A world point on the session's slices: slice ``t``, column ``x``, row ``y`` (pixel units)."""

    t: int
    x: float
    y: float


def view_axis(slice_to_ras, ijk_to_ras) -> int | None:
    """The numpy axis (0 = k, 1 = j, 2 = i) whose slices the view shows, None for an oblique view."""
    normal = np.asarray(slice_to_ras, dtype=float)[:3, 2]
    axes = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    normal = normal / np.linalg.norm(normal)
    cosines = [abs(float(normal @ (axes[:, 2 - a] / np.linalg.norm(axes[:, 2 - a])))) for a in range(3)]
    best = int(np.argmax(cosines))
    return best if cosines[best] >= np.cos(np.deg2rad(ALIGNED_DEGREES)) else None


def ras_to_kji(ras, ijk_to_ras) -> np.ndarray:
    """The continuous (k, j, i) voxel position of a world (RAS) point."""
    ijk = np.linalg.inv(np.asarray(ijk_to_ras, dtype=float)) @ np.array([*map(float, ras[:3]), 1.0])
    return ijk[2::-1]


def to_slice(ras, ijk_to_ras, axis: int, shape_kji) -> SlicePoint:
    """The slice, column and row of a world point on the volume's slices along ``axis``; InputError when
    it lies outside the volume."""
    kji = ras_to_kji(ras, ijk_to_ras)
    t = int(np.floor(kji[axis] + 0.5))
    rows, columns = [a for a in range(3) if a != axis]
    y, x = float(kji[rows]), float(kji[columns])
    inside = (0 <= t < shape_kji[axis] and -0.5 <= y <= shape_kji[rows] - 0.5
              and -0.5 <= x <= shape_kji[columns] - 0.5)
    if not inside:
        raise InputError("the click is outside the volume: click on the image")
    # Within half a voxel of the edge: on the edge pixel (the session takes pixel positions 0..n-1).
    return SlicePoint(t, min(max(x, 0.0), shape_kji[columns] - 1.0), min(max(y, 0.0), shape_kji[rows] - 1.0))


def box_on_slice(corner_a: SlicePoint, corner_b: SlicePoint) -> tuple[int, tuple[float, float, float, float]]:
    """The slice and [x0, y0, x1, y1] of a box dragged between two corners on one slice."""
    if corner_a.t != corner_b.t:
        raise InputError("the box's corners lie on different slices: drag it on one slice")
    return corner_a.t, (min(corner_a.x, corner_b.x), min(corner_a.y, corner_b.y),
                        max(corner_a.x, corner_b.x), max(corner_a.y, corner_b.y))


def plane_for_axis(volume: Volume, axis: int) -> str | None:
    """The frames' axis choice (auto, axial, coronal, sagittal) that slices ``volume`` along ``axis``: auto
    when the acquisition axis is that one, else the plane name the engine maps to it (None: no choice does,
    a volume so oblique that two plane names pick the same voxel axis)."""
    if slicing_axis(volume, "auto") == axis:
        return "auto"
    return next((p for p in reversed(PLANES) if slicing_axis(volume, p) == axis), None)


def axis_plane_name(volume: Volume, axis: int) -> str:
    """axial, coronal or sagittal: the anatomical plane the slices along ``axis`` lie closest to."""
    column = volume.ijk_to_ras()[:3, 2 - axis]
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(column)))]


def refusal_for_view(volume: Volume, session_axis: int, shown_axis: int | None) -> str:
    """The one sentence that says why a click on this view cannot go to the session."""
    plane = axis_plane_name(volume, session_axis)
    if shown_axis is None:
        return (f"this view cuts the volume obliquely; SAM2 works on the volume's own {plane} slices: click in "
                f"a view aligned with the volume (the Segment Editor's slice-orientation button resets a view)")
    return (f"this view shows {axis_plane_name(volume, shown_axis)} slices and the SAM2 prompts are on {plane} "
            f"slices: click in a {plane} view, or Clear prompts to start again in this one")
