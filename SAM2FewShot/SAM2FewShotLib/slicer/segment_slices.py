"""One segment's voxels on one slice (or the whole volume) of a volume's grid, read and replaced in place.

The click session writes SAM2's mask of one slice into the user's segment and nothing else: the other
slices, the other segments, the segment's id, name, colour and place stay. Writing goes the way the
Segment Editor's own effects modify a segment (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap in
Slicer 5.10: vtkSlicerSegmentationsModuleLogic::SetBinaryLabelmapToSegment with MODE_MERGE_MIN to
erase, MODE_MERGE_MASK to add, limited to the modifier's extent, no other segment overwritten): the
slice is erased within its extent, then the mask is added. Geometry is the volume's grid (world RAS);
the segmentation node's parent transforms are undone on writing and applied on reading by the MRML
bridge's resampling (mrml_segments.py). No Qt: the same code runs headless on slicer-core.
"""

from __future__ import annotations

import numpy as np

from ..common.errors import InputError
from ..io.volume import Volume
from .mrml_segments import (
    _into_node_frame,
    _resample,
    _transform_between,
    fill_image,
    geometry_image,
    labels_from_segmentation,
    register_segmentation_converters,
)
from .mrml_volume import mrml
from .panel import slice_digests


def slice_digest(mask: np.ndarray) -> bytes:
    """The digest of one (rows, columns) slice, as panel.slice_digests makes them for a whole mask."""
    return slice_digests(np.asarray(mask)[None], 0)[0]


def _segment(seg_node, segment_id: str):
    segment = seg_node.GetSegmentation().GetSegment(segment_id) if seg_node is not None else None
    if segment is None:
        raise InputError(f"the segment '{segment_id}' is no longer in the segmentation")
    return segment


def _region(grid: Volume, axis: int | None, t: int | None) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(shape_kji, start_ijk) of slice ``t`` along ``axis``, or of the whole grid when ``axis`` is None."""
    shape = list(grid.array.shape)
    start = [0, 0, 0]
    if axis is not None:
        shape[axis], start[axis] = 1, int(t)
    return tuple(shape), (start[2], start[1], start[0])


def read_slice(seg_node, segment_id: str, grid: Volume, axis: int, t: int) -> np.ndarray:
    """The segment's (rows, columns) mask on slice ``t`` along ``axis`` of ``grid``."""
    register_segmentation_converters()
    segment = _segment(seg_node, segment_id)
    name = mrml().vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if not seg_node.GetSegmentation().CreateRepresentation(name):
        raise InputError(f"segmentation '{seg_node.GetName()}' cannot be converted to a binary labelmap")
    layer = segment.GetRepresentation(name)
    shape, start = _region(grid, axis, t)
    geometry = geometry_image(grid.ijk_to_ras(), shape, start)
    to_world = _transform_between(seg_node.GetParentTransformNode(), None)
    values = _resample(layer, geometry, to_world, shape)
    return np.take(values == segment.GetLabelValue(), 0, axis=axis)


def read_segment(seg_node, segment_id: str, grid: Volume) -> np.ndarray:
    """The segment's (k, j, i) mask on the whole grid."""
    _segment(seg_node, segment_id)
    return labels_from_segmentation(seg_node, grid, [segment_id]).volume.array > 0


def write_slice(seg_node, segment_id: str, grid: Volume, axis: int, t: int, mask: np.ndarray) -> None:
    """Replace the segment's voxels on slice ``t`` along ``axis`` by ``mask`` (rows, columns)."""
    shape, _ = _region(grid, axis, t)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(n for a, n in enumerate(shape) if a != axis):
        raise InputError(f"a mask of shape {list(mask.shape)} does not fit slice {t} of the volume")
    _replace(seg_node, segment_id, grid, axis, t, np.expand_dims(mask, axis))


def write_volume_mask(seg_node, segment_id: str, grid: Volume, mask: np.ndarray) -> None:
    """Replace the segment's voxels on the whole grid by ``mask`` (k, j, i)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != grid.array.shape:
        raise InputError(f"a mask of shape {list(mask.shape)} does not fit the volume {list(grid.array.shape)}")
    _replace(seg_node, segment_id, grid, None, None, mask)


def _replace(seg_node, segment_id: str, grid: Volume, axis: int | None, t: int | None, mask: np.ndarray) -> None:
    """Erase the region (its extent only), then add the mask there: the Segment Editor's Remove and Add."""
    register_segmentation_converters()
    _segment(seg_node, segment_id)
    logic = mrml().vtkSlicerSegmentationsModuleLogic
    shape, start = _region(grid, axis, t)
    erase = _layer(grid, shape, start, np.zeros(shape, dtype=np.uint8), seg_node)
    add = _layer(grid, shape, start, mask.astype(np.uint8), seg_node)
    was_modifying = seg_node.StartModify()
    try:
        for layer, mode in ((erase, logic.MODE_MERGE_MIN), (add, logic.MODE_MERGE_MASK)):
            if not logic.SetBinaryLabelmapToSegment(layer, seg_node, segment_id, mode, layer.GetExtent(), False, []):
                raise InputError(f"could not write into segment '{_segment(seg_node, segment_id).GetName()}'")
    finally:
        seg_node.EndModify(was_modifying)


def _layer(grid: Volume, shape, start_ijk, values: np.ndarray, seg_node):
    """A labelmap of ``values`` at the region of the grid, in the segmentation node's frame."""
    layer = geometry_image(grid.ijk_to_ras(), shape, start_ijk)
    fill_image(layer, values, start_ijk)
    return _into_node_frame(layer, seg_node)
