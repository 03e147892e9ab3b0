"""Point and box prompts from Markups nodes: the panel's *Prompt points* and *Prompt boxes* for Propagate.

Works on the nodes' own methods only (imports no Qt, no slicer, no vtk), so it is tested headless against
Slicer's real MRML (the slicer-core wheel). Positions are read in world coordinates (a parent transform
of a Markups node applies) and mapped through the query's world geometry (``mrml_volume.volume_from_node``)
to its voxel indices, the coordinates of the engine's prompts file (methods/propagate.py).

The rules (the module's help text says them to the user):

- **Which segment**: a control point goes to the segment named by its label (its name in the Markups
  module's table), else by its point list's name; a ROI to the segment named by its own name; names
  match without regard to case. When only one segment is checked, everything goes to it.
- **Include or exclude**: a control point that is *selected* (the Markups module's "Selected" column,
  checked for every new point) includes; an unselected one excludes (SAM2's negative click).
- **A ROI** is a box on the slice through its centre along the slicing axis, covering the voxels whose
  centres lie inside it there (its in-plane extent, the bounding box of a rotated ROI); its extent along
  the slicing axis bounds its segment: no voxel of the segment outside those slices. One ROI per segment.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..common.errors import InputError
from ..io.volume import Segment, Volume

EPSILON = 1e-3  # voxels: a ROI face on a voxel centre (up to rounding) keeps that voxel


@dataclass(frozen=True)
class MarkupsPrompts:
    """Prompts of a run in the engine's terms: its prompts file's entries and each label's slice bounds."""

    entries: tuple[dict, ...]  # {"label", "box_ijk" and/or "points_ijk" + "point_labels"}, one per label and slice
    bounds: dict[int, tuple[int, int]]  # label value -> first, last slice along the slicing axis (a ROI's extent)
    axis: int  # the numpy axis (0 = k, 1 = j, 2 = i) the slices are cut along

    def as_json(self) -> dict:
        """The prompts file's content (methods/propagate.py reads it)."""
        return {"prompts": [dict(e) for e in self.entries]}

    def slices(self) -> dict[int, frozenset]:
        """label value -> the slices with its points or box (the run's prompt slices)."""
        out: dict[int, set] = {}
        for e in self.entries:
            out.setdefault(e["label"], set()).add(_slice_of(e, self.axis))
        return {v: frozenset(s) for v, s in out.items()}


def markups_prompts(query: Volume, query_name: str, segments: Sequence[Segment], axis: int, points_node=None,
                    roi_nodes: Sequence = (), mask_slices: dict[int, frozenset] | None = None) -> MarkupsPrompts:
    """The prompts of ``points_node`` (a vtkMRMLMarkupsFiducialNode) and ``roi_nodes`` (vtkMRMLMarkupsROINode)
    on the query's voxel grid, sliced along numpy ``axis``; ``segments`` are the checked segments (their label
    values), ``mask_slices`` the slices where each already has a drawn mask. InputError in one sentence."""
    if not segments:
        raise InputError("check the segments the points and boxes are for")
    to_ijk = np.linalg.inv(query.ijk_to_ras())
    shape = np.asarray(query.shape_ijk)
    slicing = 2 - axis  # the slicing axis as an (i, j, k) index
    grid = _Grid(to_ijk, shape, query_name)
    per_slice: dict[tuple[int, int], dict] = {}
    bounds: dict[int, tuple[int, int]] = {}
    owners: dict[int, str] = {}
    for node in roi_nodes:
        name = node.GetName()
        value = _segment((name,), segments, f"the ROI '{name}'")
        if value in owners:
            raise InputError(f"the ROIs '{owners[value]}' and '{name}' both prompt segment "
                             f"'{_name(segments, value)}': use one ROI per segment")
        owners[value] = name
        low, high, centre = grid.roi(node)
        bounds[value] = (int(low[slicing]), int(high[slicing]))
        first, second = low.copy(), high.copy()
        first[slicing] = second[slicing] = centre[slicing]
        per_slice[(value, int(centre[slicing]))] = {"label": value, "box_ijk": [first.tolist(), second.tolist()]}
    if points_node is not None:
        for value, ijk, label, what in grid.points(points_node, segments):
            first, last = bounds.get(value, (0, shape[slicing] - 1))
            if not first <= ijk[slicing] <= last:
                raise InputError(f"{what} lies on slice {ijk[slicing]}, outside the slices {first}-{last} of the "
                                 f"ROI '{owners[value]}' for segment '{_name(segments, value)}'")
            entry = per_slice.setdefault((value, int(ijk[slicing])), {"label": value})
            entry.setdefault("points_ijk", []).append(ijk.tolist())
            entry.setdefault("point_labels", []).append(label)
    for value, t in sorted(per_slice):
        if t in (mask_slices or {}).get(value, ()):
            raise InputError(f"segment '{_name(segments, value)}' has a drawn mask and points or a box on slice {t}: "
                             "use one or the other on a slice")
    return MarkupsPrompts(tuple(per_slice[k] for k in sorted(per_slice)), bounds, axis)


class _Grid:
    """World RAS positions to voxel indices of the query, with the one-sentence errors."""

    def __init__(self, to_ijk: np.ndarray, shape: np.ndarray, name: str):
        self.to_ijk, self.shape, self.name = to_ijk, shape, name

    def continuous(self, ras) -> np.ndarray:
        """(P, 3) RAS -> (P, 3) continuous (i, j, k): voxel centres at whole numbers."""
        ras = np.atleast_2d(np.asarray(ras, dtype=float))
        return (np.c_[ras, np.ones(len(ras))] @ self.to_ijk.T)[:, :3]

    def points(self, node, segments: Sequence[Segment]):
        """(label value, (i, j, k), 1 include / 0 exclude, what) per placed control point of a point list."""
        name = node.GetName()
        placed = [n for n in range(node.GetNumberOfControlPoints())
                  if node.GetNthControlPointPositionStatus(n) == node.PositionDefined]
        if not placed:
            raise InputError(f"the point list '{name}' has no placed point: place some, or choose no point list")
        for n in placed:
            ras = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(n, ras)
            label = node.GetNthControlPointLabel(n)
            what = f"point '{label}' of '{name}'"
            ijk = np.floor(self.continuous(ras)[0] + 0.5).astype(int)  # the voxel it lies in
            if (ijk < 0).any() or (ijk > self.shape - 1).any():
                raise InputError(f"{what} lies outside the volume '{self.name}'")
            value = _segment((label, name), segments, what)
            yield value, ijk, 1 if node.GetNthControlPointSelected(n) else 0, what

    def roi(self, node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first and last voxel indices (i, j, k) whose centres lie inside the ROI, clipped to the volume,
        and the voxel of its centre, clipped into that range."""
        name = node.GetName()
        if node.GetNumberOfDefinedControlPoints() == 0:
            raise InputError(f"the ROI '{name}' is not placed yet")
        matrix = node.GetObjectToWorldMatrix()
        to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        half = np.asarray(node.GetSize(), dtype=float) / 2.0
        corners = np.array([(*(s * half), 1.0) for s in itertools.product((-1.0, 1.0), repeat=3)])
        ijk = self.continuous((corners @ to_world.T)[:, :3])
        centre_world = [0.0, 0.0, 0.0]
        node.GetCenterWorld(centre_world)
        centre = np.floor(self.continuous(centre_world)[0] + 0.5).astype(int)
        low = np.ceil(ijk.min(axis=0) - EPSILON).astype(int)
        high = np.floor(ijk.max(axis=0) + EPSILON).astype(int)
        thin = low > high  # thinner than a voxel between two centres: the voxel of its centre
        low[thin], high[thin] = centre[thin], centre[thin]
        low, high = np.maximum(low, 0), np.minimum(high, self.shape - 1)
        if (low > high).any():
            raise InputError(f"the ROI '{name}' does not intersect the volume '{self.name}'")
        return low, high, np.clip(centre, low, high)


def _slice_of(entry: dict, axis: int) -> int:
    corner = (entry.get("box_ijk") or entry["points_ijk"])[0]
    return int(corner[2 - axis])


def _segment(names: Sequence[str], segments: Sequence[Segment], what: str) -> int:
    """The label value of the segment the first of ``names`` names, else of the only segment."""
    by_name: dict[str, int] = {}
    for s in segments:
        by_name.setdefault(s.name.strip().casefold(), s.value)
    for name in names:
        value = by_name.get((name or "").strip().casefold())
        if value is not None:
            return value
    if len(segments) == 1:
        return segments[0].value
    listed = ", ".join(f"'{s.name}'" for s in segments)
    raise InputError(f"{what} names none of the checked segments ({listed}): name it after its segment, "
                     "or check one segment only")


def _name(segments: Sequence[Segment], value: int) -> str:
    return next(s.name for s in segments if s.value == value)
