"""Where a slice's rows and columns run in space, and stacks of 2D slices brought from one such frame into another.

A volume cut along a plane gives slices whose rows and columns follow two of its voxel axes, in the order
and sense the file stored them: the same anatomy stored RAS instead of LPS, or transposed, gives mirrored
or transposed slices, and another in-plane spacing another pixel grid. ``SliceFrame`` says where a stack's
rows and columns run (LPS unit vectors) and at what spacing; ``turn_into`` transposes and flips a stack so
its axes follow another frame's order and sense (a view: nothing interpolated), and ``into_frame`` also
resamples it onto the other frame's spacing and, when the two are rotated in the plane, its axes (SimpleITK:
linear for images, nearest for labels), the 2D counterpart of io/reorient's whole-volume support_in_query_frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..common.errors import InputError
from .reorient import DIRECTION_TOL, MAX_VOXELS, SPACING_TOL
from .slicing import ANATOMICAL_AXES
from .volume import Volume


@dataclass(frozen=True)
class SliceFrame:
    """The LPS directions in which a slice's row index (array axis 0) and column index (axis 1) grow, and
    the spacing (mm) between rows and between columns."""

    rows: tuple[float, float, float]
    cols: tuple[float, float, float]
    spacing: tuple[float, float]

    @property
    def axes(self) -> np.ndarray:
        """(3, 2): the row direction, then the column direction, as columns."""
        return np.stack([np.asarray(self.rows, dtype=float), np.asarray(self.cols, dtype=float)], axis=1)


@dataclass(frozen=True)
class Turn:
    """A transpose (first) and flips of the rows and columns (after it): the axis order and sense that
    bring one frame closest to another."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)


def slice_frame(volume: Volume, axis: int) -> SliceFrame:
    """The frame of ``np.moveaxis(volume.array, axis, 0)[s]``: the two other numpy axes, in array order."""
    rows, cols = (a for a in range(3) if a != axis)
    direction = volume.direction_matrix
    return SliceFrame(tuple(float(v) for v in direction[:, 2 - rows]), tuple(float(v) for v in direction[:, 2 - cols]),
                      (float(volume.spacing[2 - rows]), float(volume.spacing[2 - cols])))


def lps_frame(plane: str, spacing: tuple[float, float] = (1.0, 1.0)) -> SliceFrame:
    """The slices of an LPS-stored volume (identity direction) in ``plane``: rows along the higher of the
    plane's two LPS axes, columns along the lower, both growing (axial: rows P, columns L)."""
    normal = ANATOMICAL_AXES[plane]
    low, high = (a for a in range(3) if a != normal)
    eye = np.eye(3)
    return SliceFrame(tuple(eye[:, high]), tuple(eye[:, low]), spacing)


def turn_between(own: SliceFrame, target: SliceFrame) -> Turn:
    """The transpose and flips that make ``own``'s rows and columns run as close as they can to ``target``'s:
    the pairing with the larger cosines, then each axis's sense (exact for a volume stored with another
    axis order or sign; the nearest for one rotated in the plane)."""
    relation = target.axes.T @ own.axes  # [t, o]: cosine between target axis t and own axis o
    transpose = abs(relation[0, 1]) + abs(relation[1, 0]) > abs(relation[0, 0]) + abs(relation[1, 1])
    if transpose:
        relation = relation[:, ::-1]
    return Turn(bool(transpose), bool(relation[0, 0] < 0), bool(relation[1, 1] < 0))


def turned(stack: np.ndarray, turn: Turn) -> np.ndarray:
    """(N, H, W) turned as ``turn`` says: a view of ``stack`` (strides may be negative)."""
    if turn.transpose:
        stack = np.swapaxes(stack, 1, 2)
    if turn.flip_rows:
        stack = stack[:, ::-1]
    if turn.flip_cols:
        stack = stack[:, :, ::-1]
    return stack


def turned_frame(frame: SliceFrame, turn: Turn) -> SliceFrame:
    """The frame of a stack after ``turned``."""
    rows, cols, spacing = np.asarray(frame.rows), np.asarray(frame.cols), frame.spacing
    if turn.transpose:
        rows, cols, spacing = cols, rows, (spacing[1], spacing[0])
    rows, cols = -rows if turn.flip_rows else rows, -cols if turn.flip_cols else cols
    return SliceFrame(tuple(float(v) for v in rows), tuple(float(v) for v in cols), spacing)


def turn_into(stack: np.ndarray, own: SliceFrame, target: SliceFrame) -> tuple[np.ndarray, SliceFrame]:
    """The stack with ``target``'s axis order and sense (a view), and its frame after the turn."""
    turn = turn_between(own, target)
    return turned(stack, turn), turned_frame(own, turn)


def into_frame(stack: np.ndarray, own: SliceFrame, target: SliceFrame, linear: bool) -> np.ndarray:
    """The stack as ``target``'s slices show it: turned, then resampled onto ``target``'s spacing and axes
    when a turn is not enough (covering every pixel centre; outside them the image's minimum, or 0 for
    labels). A view when the turn suffices (same axes within 0.06 degrees, same spacing within 1 %)."""
    stack, own = turn_into(stack, own, target)
    relation = target.axes.T @ own.axes
    same_axes = float(np.max(np.abs(relation - np.eye(2)))) <= DIRECTION_TOL
    wanted, have = np.asarray(target.spacing, dtype=float), np.asarray(own.spacing, dtype=float)
    if same_axes and np.all(np.abs(have - wanted) <= SPACING_TOL * wanted):
        return stack
    return _resampled(stack, have, np.eye(2) if same_axes else _nearest_rotation(relation), wanted, linear)


def _nearest_rotation(relation: np.ndarray) -> np.ndarray:
    """The orthogonal 2x2 matrix nearest ``relation`` (which a tilt out of the plane shortens)."""
    u, _, vt = np.linalg.svd(relation)
    return u @ vt


def _resampled(stack: np.ndarray, spacing: np.ndarray, rotation: np.ndarray, wanted: np.ndarray,
               linear: bool) -> np.ndarray:
    """(N, H', W'): each slice sampled on a grid at ``wanted`` spacing along the target axes, where
    ``rotation`` [t, o] takes the stack's (row, column) directions into the target's."""
    import SimpleITK as sitk

    n, h, w = stack.shape
    corners = np.array([[0, 0], [h - 1, 0], [0, w - 1], [h - 1, w - 1]], dtype=float).T * spacing[:, None]
    target = rotation @ corners  # (row, column) coordinates along the target axes
    low, high = target.min(axis=1), target.max(axis=1)
    size = np.ceil((high - low) / wanted - 1e-6).astype(int) + 1
    if n * int(np.prod(size)) > MAX_VOXELS:
        raise InputError(f"library slices too large to resample into the query's frame ({n}x{size[0]}x{size[1]})")
    image = sitk.GetImageFromArray(np.ascontiguousarray(stack if linear else stack.astype(np.int32)))
    image.SetSpacing((float(spacing[1]), float(spacing[0]), 1.0))  # ITK order: columns (x), rows (y), slices
    direction = np.eye(3)
    direction[:2, :2] = rotation[::-1, ::-1]  # ITK's (x, y) are the (column, row) of numpy's order
    image.SetDirection(tuple(direction.ravel()))
    f = sitk.ResampleImageFilter()
    f.SetSize((int(size[1]), int(size[0]), int(n)))
    f.SetOutputSpacing((float(wanted[1]), float(wanted[0]), 1.0))
    f.SetOutputOrigin((float(low[1]), float(low[0]), 0.0))
    f.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(float(np.min(stack)) if linear and stack.size else 0.0)
    out = sitk.GetArrayFromImage(f.Execute(image))
    return out if linear else out.astype(stack.dtype)
