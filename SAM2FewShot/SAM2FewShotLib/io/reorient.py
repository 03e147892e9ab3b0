"""A support case brought into the query's frame: the query's axes, orientation and in-plane spacing.

Support slices are compared with and stacked beside the query's slices voxel for voxel. A support
stored another way (RAS vs LPS, transposed, acquired in another plane, oblique, or at another
in-plane spacing) would otherwise give mirrored, rotated or stretched images and masks. Supports
that already match are returned as they are; a support that differs by axis order and flips only
(at the query's in-plane spacing) becomes a view of its own arrays, with no copy and no
interpolation; anything else is resampled with SimpleITK (linear for the image, nearest for labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..common.errors import InputError
from .slicing import slicing_axis
from .volume import LabelMap, Volume

DIRECTION_TOL = 1e-3  # direction cosines closer than this count as the same axes (about 0.06 degrees)
SPACING_TOL = 0.01  # in-plane spacings within 1 % count as the query's
MAX_VOXELS = 1 << 30  # a resampled support larger than this is refused, not attempted


@dataclass(frozen=True)
class Grid:
    """Where a support is sampled in the query's frame: ITK-ordered (i, j, k) size, spacing, origin,
    and the row-major direction matrix."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy (k, j, i) shape."""
        return self.size[2], self.size[1], self.size[0]


def support_in_query_frame(image: Volume, labels: LabelMap, query: Volume,
                           axis: int | None = None) -> tuple[Volume, LabelMap]:
    """The support with the query's direction and in-plane spacing (``axis``: the query's slicing axis,
    numpy order; default its acquisition axis), its own spacing through the plane, covering all of it.

    The same objects come back when the support already matches; a pure axis swap or flip gives
    views of the support's arrays (which may have negative strides).
    """
    image.require_same_grid(labels.volume, "support labels")
    axis = slicing_axis(query) if axis is None else axis
    moved = _without_resampling(image, query, axis)
    if moved is image:
        return image, labels
    if moved is not None:  # the labels share the image's grid, so they move the same way
        return moved, LabelMap(_without_resampling(labels.volume, query, axis), labels.segments)
    grid = query_frame_grid(image, query, axis)
    return _resampled(image, grid, linear=True), LabelMap(_resampled(labels.volume, grid, linear=False),
                                                          labels.segments)


def query_frame_shape(image: Volume, query: Volume, axis: int) -> tuple[int, int, int]:
    """The numpy (k, j, i) shape ``support_in_query_frame`` gives, from the headers alone (no resampling)."""
    moved = _without_resampling(image, query, axis)
    return moved.array.shape if moved is not None else query_frame_grid(image, query, axis).shape


def query_frame_grid(image: Volume, query: Volume, axis: int) -> Grid:
    """The query's direction, its spacing along the slice plane, the support's own spacing along the
    voxel axis closest to the query's slice normal; the box around every support voxel centre."""
    direction = query.direction_matrix
    normal_col = 2 - axis  # ITK column of the query's slicing axis
    own = image.direction_matrix
    through = int(np.argmax(np.abs(own.T @ direction[:, normal_col])))
    spacing = np.array(query.spacing, dtype=float)
    spacing[normal_col] = image.spacing[through]
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.shape_ijk], indexing="ij")).reshape(3, -1)
    points = image.ijk_to_lps()[:3, :3] @ corners + np.asarray(image.origin)[:, None]
    local = direction.T @ points  # coordinates along the query's axes
    low, high = local.min(axis=1), local.max(axis=1)
    size = np.ceil((high - low) / spacing - 1e-6).astype(int) + 1
    if int(np.prod(size)) > MAX_VOXELS:
        raise InputError(f"the support is too large to resample into the query's orientation "
                         f"({'x'.join(map(str, size))} voxels at {_fmt(spacing)} mm)")
    return Grid(tuple(int(s) for s in size), tuple(float(s) for s in spacing), tuple(float(v) for v in direction @ low),
                tuple(float(v) for v in direction.ravel()))


def _without_resampling(volume: Volume, query: Volume, axis: int) -> Volume | None:
    """The volume itself when it matches the query's frame, a transposed/flipped view when that
    suffices, else None (it must be resampled)."""
    if _matches(volume.direction_matrix, volume.spacing, query, axis):
        return volume
    order = _axis_order(volume.direction_matrix, query.direction_matrix)
    if order is None:
        return None
    moved = _permuted(volume, order)
    return moved if _matches(moved.direction_matrix, moved.spacing, query, axis) else None


def _matches(direction: np.ndarray, spacing, query: Volume, axis: int) -> bool:
    """Same axes as the query, and its spacing along the query's slice plane (within 1 %)."""
    if np.max(np.abs(direction - query.direction_matrix)) > DIRECTION_TOL:
        return False
    in_plane = [c for c in range(3) if c != 2 - axis]
    own, wanted = np.asarray(spacing, dtype=float)[in_plane], np.asarray(query.spacing, dtype=float)[in_plane]
    return bool(np.all(np.abs(own - wanted) <= SPACING_TOL * wanted))


def _axis_order(own: np.ndarray, target: np.ndarray) -> list[tuple[int, float]] | None:
    """Per target axis, (the support axis along it, +1 or -1) when the two differ by axis order and
    flips only; else None."""
    relation = target.T @ own  # [q, s]: cosine between target axis q and support axis s
    order = []
    for q in range(3):
        s = int(np.argmax(np.abs(relation[q])))
        if abs(abs(relation[q, s]) - 1.0) > DIRECTION_TOL:
            return None
        order.append((s, float(np.sign(relation[q, s]))))
    return order if len({s for s, _ in order}) == 3 else None


def _permuted(volume: Volume, order: list[tuple[int, float]]) -> Volume:
    """The volume with its ITK axes reordered and flipped as ``order`` says: a view, same voxels in space."""
    array = np.transpose(volume.array, [2 - order[2 - a][0] for a in range(3)])
    own = volume.direction_matrix
    origin = np.asarray(volume.origin, dtype=float)
    for q, (s, sign) in enumerate(order):
        if sign < 0:
            array = np.flip(array, axis=2 - q)
            origin = origin + own[:, s] * volume.spacing[s] * (volume.shape_ijk[s] - 1)
    direction = np.stack([own[:, s] * sign for s, sign in order], axis=1)
    return Volume(array, tuple(volume.spacing[s] for s, _ in order), tuple(origin), tuple(direction.ravel()))


def _resampled(volume: Volume, grid: Grid, linear: bool) -> Volume:
    """The volume sampled on ``grid``; the image keeps its pixel type (outside its box: its minimum)."""
    import SimpleITK as sitk

    f = sitk.ResampleImageFilter()
    f.SetSize(grid.size)
    f.SetOutputSpacing(grid.spacing)
    f.SetOutputOrigin(grid.origin)
    f.SetOutputDirection(grid.direction)
    f.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(float(np.min(volume.array)) if linear and volume.array.size else 0.0)
    return Volume.from_sitk(f.Execute(volume.to_sitk()))


def _fmt(values) -> str:
    return "x".join(f"{v:.3g}" for v in values)
