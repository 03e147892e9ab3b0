"""Segmentation nodes <-> LabelMap: segments with names, colours and terminology, on any grid.

Geometry is never assumed: every binary labelmap keeps its own image-to-world matrix, and the
segmentation node's parent transforms are applied (reading) or undone (writing) by Slicer's own
resampling code, so a segmentation made on another grid or moved by a transform lands on the
right voxels of the query.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..common.errors import InputError
from ..io.volume import LabelMap, Segment, Volume
from .mrml_volume import (
    array_from_image,
    fill_image,
    linear_to_world,
    matrix_to_numpy,
    mrml,
    node_ijk_to_ras,
    numpy_to_matrix,
    require_node,
)

POLICIES = ("keep", "replace", "add")
_DISPLAY_PROPERTIES = (
    "Visibility", "Visibility3D", "Visibility2DFill", "Visibility2DOutline",
    "Opacity3D", "Opacity2DFill", "Opacity2DOutline",
)
_CONVERSION_RULES = (
    "vtkBinaryLabelmapToClosedSurfaceConversionRule",
    "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    "vtkClosedSurfaceToFractionalLabelmapConversionRule",
    "vtkFractionalLabelmapToClosedSurfaceConversionRule",
)


_converters_ready = False


def register_segmentation_converters() -> None:
    """Register Slicer's segmentation conversion rules where nobody has (headless MRML).

    3D Slicer's Segmentations module does this at startup; without the rules a segmentation
    cannot even make an empty binary labelmap. A segmentation copies the rules when it is
    created, so call this before creating segmentation nodes headless. Idempotent.
    """
    global _converters_ready
    if _converters_ready:
        return
    slicer = mrml()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.ConstructRepresentationObjectByRepresentation(_labelmap_name()) is None:
        for name in _CONVERSION_RULES:
            factory.RegisterConverterRule(getattr(slicer, name)())
    _converters_ready = True


def labels_from_segmentation(
    seg_node, reference: Volume, segment_ids: Sequence[str] | None = None
) -> LabelMap:
    """The chosen segments (all by default) as one label map on the ``reference`` grid.

    Each labelmap layer is resampled (nearest neighbour) from its own geometry through the node's
    parent transforms onto the reference grid. Values are 1..N in the order of ``segment_ids``
    (the segmentation's order by default); where segments overlap, the later one wins. A chosen
    segment without voxels is kept. Repeated segment names get " (2)", " (3)"... appended.
    """
    require_node(seg_node, "vtkMRMLSegmentationNode", "segmentation")
    ids = _chosen_ids(seg_node, segment_ids)
    out = np.zeros(reference.array.shape, dtype=np.uint8 if len(ids) < 256 else np.uint16)
    for value, (_, mask) in enumerate(segment_masks(seg_node, reference, ids), start=1):
        out[mask] = value
    return LabelMap(reference.with_array(out), segments_of(seg_node, ids))


def segments_of(seg_node, segment_ids: Sequence[str]) -> tuple[Segment, ...]:
    """The segments' names, colours and terminology, valued 1..N in the order of ``segment_ids`` (repeated
    names get " (2)", " (3)"...): what labels_from_segmentation gives them."""
    segments: list[Segment] = []
    for value, segment_id in enumerate(segment_ids, start=1):
        segment = seg_node.GetSegmentation().GetSegment(segment_id)
        name = unique_name(segment.GetName() or segment_id, {s.name for s in segments})
        segments.append(Segment(value, name, _color(segment), _terminology(segment)))
    return tuple(segments)


def segment_masks(seg_node, reference: Volume,
                  segment_ids: Sequence[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(id, the segment's own (k, j, i) mask on ``reference``) for each chosen segment, one at a time: each
    segment whole where segments overlap (a label map keeps one per voxel). A labelmap layer shared by
    consecutive segments is resampled once, and only one layer is held at a time."""
    require_node(seg_node, "vtkMRMLSegmentationNode", "segmentation")
    register_segmentation_converters()
    segmentation = seg_node.GetSegmentation()
    ids = _chosen_ids(seg_node, segment_ids)
    if ids and not segmentation.CreateRepresentation(_labelmap_name()):
        raise InputError(f"segmentation '{seg_node.GetName()}' cannot be converted to a binary labelmap")
    to_world = _transform_between(seg_node.GetParentTransformNode(), None)
    geometry = geometry_image(reference.ijk_to_ras(), reference.array.shape)
    key, values = None, None
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        layer = segment.GetRepresentation(_labelmap_name())
        layer_key = layer.GetAddressAsString("vtkObject") if layer is not None else ""
        if layer_key != key:
            key, values = layer_key, _resample(layer, geometry, to_world, reference.array.shape)
        yield segment_id, values == segment.GetLabelValue()


def add_labels_to_segmentation(
    seg_node, labels: LabelMap, reference_node=None, existing: str = "keep"
) -> list[str]:
    """Add each segment of ``labels`` to ``seg_node`` with its name, colour and terminology.

    For a name the segmentation already has, ``existing`` decides: "keep" leaves that segment
    untouched and skips the new one, "replace" overwrites its voxels (its id, name, colour and
    place in the list stay), "add" adds a new segment named "name (2)". Other segments are never
    touched. Voxels are placed by the label map's own geometry (world RAS) and the node's parent
    transforms are undone, so they land right on any segmentation. ``reference_node`` becomes the
    segmentation's reference geometry when it has none (the grid the Segment Editor works on).
    All changes are one MRML modification and, when the scene records undo, one undo step.
    Returns the ids of the segments created or replaced, in the label map's order.
    """
    require_node(seg_node, "vtkMRMLSegmentationNode", "segmentation")
    if existing not in POLICIES:
        raise InputError(f"unknown policy for existing segments '{existing}': use {', '.join(POLICIES)}")
    if reference_node is not None:
        require_node(reference_node, "vtkMRMLScalarVolumeNode", "reference volume")
    register_segmentation_converters()
    writes = _plan_writes(seg_node.GetSegmentation(), labels, existing)
    with one_undo_step(seg_node):
        return _apply_writes(seg_node, labels, writes, reference_node)


def write_segments(seg_node, labels: LabelMap, targets: Mapping[int, str], reference_node=None,
                   remove: Sequence[str] = ()) -> list[str]:
    """Write every segment of ``labels`` into the segment ``targets[value]`` (replaced in place:
    id, name, colour and place kept) or, where the target is "" or missing, a new segment named
    uniquely; first remove the segments ``remove`` names. One modification (and undo step).
    Returns the written ids in the label map's order."""
    require_node(seg_node, "vtkMRMLSegmentationNode", "segmentation")
    if reference_node is not None:
        require_node(reference_node, "vtkMRMLScalarVolumeNode", "reference volume")
    register_segmentation_converters()
    segmentation = seg_node.GetSegmentation()
    for segment_id in (*targets.values(), *remove):
        if segment_id and segmentation.GetSegment(segment_id) is None:
            raise InputError(f"segmentation '{seg_node.GetName()}' has no segment with id {segment_id}")
    taken = {segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())}
    writes = []
    for segment in labels.segments:
        target = targets.get(segment.value, "")
        name = segment.name if target else unique_name(segment.name, taken)
        taken.add(name)
        writes.append(_Write(segment, name, target))
    with one_undo_step(seg_node):
        for segment_id in remove:
            segmentation.RemoveSegment(segment_id)
        return _apply_writes(seg_node, labels, writes, reference_node)


def _apply_writes(seg_node, labels: LabelMap, writes: list[_Write], reference_node) -> list[str]:
    layer = _shared_layer(labels, [w.segment.value for w in writes], seg_node) if writes else None
    if reference_node is not None and not _reference_geometry_string(seg_node):
        seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    if seg_node.GetScene() is not None and seg_node.GetDisplayNode() is None:
        seg_node.CreateDefaultDisplayNodes()
    return [_write_segment(seg_node, w, layer) for w in writes]


# --- snapshots (the panel's undo) ----------------------------------------------------------------

@dataclass
class SegmentSnapshot:
    """A segment as it was: metadata, voxels in a layer of its own, display, place in the list."""

    segment_id: str
    index: int
    segment: object  # vtkSegment, not in any segmentation
    display: dict


def snapshot_segment(seg_node, segment_id: str) -> SegmentSnapshot:
    """A copy of the segment that later edits of the segmentation cannot reach."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    slicer = mrml()
    segmentation = seg_node.GetSegmentation()
    source = segmentation.GetSegment(segment_id)
    copy = slicer.vtkSegment()
    copy.DeepCopyMetadata(source)
    layer = source.GetRepresentation(_labelmap_name())
    if layer is not None:
        own = slicer.vtkOrientedImageData()
        own.DeepCopy(layer)  # a shared layer holds other segments' values too: keep this one's only
        if own.GetPointData().GetScalars() is not None:
            voxels = vtk_to_numpy(own.GetPointData().GetScalars())
            voxels[:] = voxels == source.GetLabelValue()
        copy.SetLabelValue(1)
        copy.AddRepresentation(_labelmap_name(), own)
    return SegmentSnapshot(segment_id, segmentation.GetSegmentIndex(segment_id), copy,
                           _display_state(seg_node, segment_id))


def restore_segments(seg_node, snapshots: Sequence[SegmentSnapshot], remove: Sequence[str] = ()) -> None:
    """Remove the segments ``remove`` names, then put the snapshots back (same id and place)."""
    segmentation = seg_node.GetSegmentation()
    with one_undo_step(seg_node):
        for segment_id in (*remove, *(s.segment_id for s in snapshots)):
            if segmentation.GetSegment(segment_id) is not None:
                segmentation.RemoveSegment(segment_id)
        for snap in sorted(snapshots, key=lambda s: s.index):
            before = segmentation.GetNthSegmentID(snap.index) if snap.index < segmentation.GetNumberOfSegments() else ""
            segment = mrml().vtkSegment()
            segment.DeepCopy(snap.segment)  # the snapshot stays usable
            if not segmentation.AddSegment(segment, snap.segment_id, before or ""):
                raise InputError(f"could not restore segment '{snap.segment.GetName()}'")
            _restore_display(seg_node, snap.segment_id, snap.display)


def segmentation_geometry_matches(seg_node, reference_node) -> bool:
    """True when the segmentation's reference geometry is the reference volume's grid (in world).

    False when either has none, or sits under a non-linear transform.
    """
    require_node(seg_node, "vtkMRMLSegmentationNode", "segmentation")
    require_node(reference_node, "vtkMRMLScalarVolumeNode", "reference volume")
    serialized = _reference_geometry_string(seg_node)
    image = reference_node.GetImageData()
    if not serialized or image is None:
        return False
    slicer = mrml()
    seg_geometry = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, seg_geometry, False)
    seg_to_world = linear_to_world(seg_node)
    ref_to_world = linear_to_world(reference_node)
    if seg_to_world is None or ref_to_world is None:
        return False
    seg_matrix = seg_to_world @ image_to_world(seg_geometry)
    ref_matrix = ref_to_world @ node_ijk_to_ras(reference_node)
    return tuple(seg_geometry.GetExtent()) == tuple(image.GetExtent()) and bool(
        np.allclose(seg_matrix, ref_matrix, atol=1e-4)
    )


# --- undo ------------------------------------------------------------------------------------------

@contextmanager
def one_undo_step(node) -> Iterator[None]:
    """Batch the node's modifications into one event and, when the scene records undo, one step.

    Headless MRML and Slicer both keep scene undo off unless someone turns it on; when it is on,
    the node is made undoable and its state saved before the change.
    """
    scene = node.GetScene()
    if scene is not None and scene.GetUndoFlag():
        node.SetUndoEnabled(True)
        scene.SaveStateForUndo(node)
    was_modifying = node.StartModify()
    try:
        yield
    finally:
        node.EndModify(was_modifying)


# --- geometry helpers ----------------------------------------------------------------------------

def geometry_image(ijk_to_ras: np.ndarray, shape_kji: tuple[int, ...], start_ijk=(0, 0, 0)):
    """A vtkOrientedImageData carrying a grid (extent and image-to-world), without voxels."""
    image = mrml().vtkOrientedImageData()
    k, j, i = shape_kji
    i0, j0, k0 = start_ijk
    image.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    image.SetGeometryFromImageToWorldMatrix(numpy_to_matrix(ijk_to_ras))
    return image


def image_to_world(image) -> np.ndarray:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return matrix_to_numpy(matrix)


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or "name (2)", "name (3)"... whichever is not taken yet."""
    if name not in taken:
        return name
    n = 2
    while f"{name} ({n})" in taken:
        n += 1
    return f"{name} ({n})"


def _labelmap_name() -> str:
    return mrml().vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def _transform_between(source_parent, target_parent):
    """The general transform from one node's frame to another's (None for world); None if identity."""
    if source_parent is None and target_parent is None:
        return None
    from vtkmodules.vtkCommonTransforms import vtkGeneralTransform

    transform = vtkGeneralTransform()
    mrml().vtkMRMLTransformNode.GetTransformBetweenNodes(source_parent, target_parent, transform)
    return transform


def _reference_geometry_string(seg_node) -> str:
    slicer = mrml()
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    return seg_node.GetSegmentation().GetConversionParameter(name) or ""


# --- reading ---------------------------------------------------------------------------------------

def _chosen_ids(seg_node, segment_ids: Sequence[str] | None) -> list[str]:
    present = list(seg_node.GetSegmentation().GetSegmentIDs())
    if segment_ids is None:
        return present
    ids = list(segment_ids)
    missing = [s for s in ids if s not in present]
    if missing:
        raise InputError(f"segmentation '{seg_node.GetName()}' has no segment with id {', '.join(missing)}")
    if len(set(ids)) != len(ids):
        raise InputError(f"segment ids are repeated in {ids}")
    return ids


def _resample(layer, geometry, to_world, shape_kji) -> np.ndarray:
    """A labelmap layer's values on the reference grid (nearest neighbour, 0 outside it)."""
    if layer is None:
        return np.zeros(shape_kji, dtype=np.uint8)
    slicer = mrml()
    out = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        layer, geometry, out, False, False, to_world
    ):
        raise InputError("could not resample a segment onto the query grid")
    array = array_from_image(out)
    if array.shape != tuple(shape_kji):
        raise InputError(f"resampled segment has shape {array.shape}, expected {tuple(shape_kji)}")
    return array


def _color(segment) -> tuple[float, float, float]:
    return tuple(float(np.clip(c, 0.0, 1.0)) for c in segment.GetColor())


def _terminology(segment) -> str | None:
    return segment_tag(segment, segment.GetTerminologyEntryTagName()) or None


def segment_tag(segment, name: str) -> str:
    """The value of a segment's tag, "" when it has none."""
    from vtkmodules.vtkCommonCore import reference

    value = reference("")
    return str(value) if segment.GetTag(name, value) else ""


# --- writing ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Write:
    segment: Segment
    name: str
    replaces: str  # id of the segment whose voxels are overwritten, "" for a new segment


def _plan_writes(segmentation, labels: LabelMap, existing: str) -> list[_Write]:
    """What happens to each segment of the label map, decided before anything is touched."""
    taken = {segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())}
    writes = []
    for segment in labels.segments:
        present_id = segmentation.GetSegmentIdBySegmentName(segment.name) if segment.name in taken else ""
        if present_id and existing == "keep":
            continue
        if present_id and existing == "replace":
            writes.append(_Write(segment, segment.name, present_id))
            continue
        name = unique_name(segment.name, taken)
        taken.add(name)
        writes.append(_Write(segment, name, ""))
    return writes


def _shared_layer(labels: LabelMap, values: list[int], seg_node):
    """One labelmap (cropped to its voxels) holding the written values, in the node's own frame."""
    array = labels.volume.array
    kept = np.where(np.isin(array, values), array, 0)
    kept = kept.astype(np.uint8 if max(values) < 256 else np.uint16)
    nonzero = np.nonzero(kept)
    if nonzero[0].size:
        lo = [int(ax.min()) for ax in nonzero]
        hi = [int(ax.max()) + 1 for ax in nonzero]
        kept = kept[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        start_ijk = (lo[2], lo[1], lo[0])
    else:
        kept, start_ijk = kept[:1, :1, :1], (0, 0, 0)
    layer = geometry_image(labels.volume.ijk_to_ras(), kept.shape, start_ijk)
    fill_image(layer, kept, start_ijk)
    return _into_node_frame(layer, seg_node)


def _into_node_frame(layer, seg_node):
    """The world-space layer moved into the segmentation node's frame (undoing its transforms)."""
    slicer = mrml()
    to_node = _transform_between(None, seg_node.GetParentTransformNode())
    if to_node is None:
        return layer
    resample = slicer.vtkOrientedImageDataResample
    if slicer.vtkMRMLTransformNode.IsGeneralTransformLinear(to_node):
        resample.TransformOrientedImage(layer, to_node)  # only the geometry changes (shear too): exact
        return layer
    # Slicer's non-linear TransformOrientedImage sizes its result from two corners of an axis-aligned
    # box, which clips oblique grids: resample instead, padded to hold all eight transformed corners.
    moved = slicer.vtkOrientedImageData()
    if not resample.ResampleOrientedImageToReferenceOrientedImage(layer, layer, moved, False, True, to_node):
        raise InputError("could not resample the labels through the segmentation's transform")
    return moved


def _write_segment(seg_node, write: _Write, layer) -> str:
    """Add the segment (or replace one in place, keeping id, metadata, display and order); its id."""
    segmentation = seg_node.GetSegmentation()
    segment = mrml().vtkSegment()
    display = {}
    if write.replaces:
        segment.DeepCopyMetadata(segmentation.GetSegment(write.replaces))
        display = _display_state(seg_node, write.replaces)
        index = segmentation.GetSegmentIndex(write.replaces)
        last = index + 1 >= segmentation.GetNumberOfSegments()
        after = "" if last else segmentation.GetNthSegmentID(index + 1)
        # RemoveSegment lifts the old voxels out of any layer shared with the user's other segments.
        segmentation.RemoveSegment(write.replaces)
    else:
        _set_metadata(segment, write.segment, write.name)
        after = ""
    segment.SetLabelValue(write.segment.value)
    segment.AddRepresentation(_labelmap_name(), layer)
    if not segmentation.AddSegment(segment, write.replaces, after):
        raise InputError(f"could not add segment '{write.name}' to the segmentation")
    segment_id = write.replaces or segmentation.GetSegmentIdBySegment(segment)
    _restore_display(seg_node, segment_id, display)
    return segment_id


def _display_state(seg_node, segment_id: str) -> dict:
    """The segment's visibility and opacities, which removing the segment would forget."""
    display = seg_node.GetDisplayNode()
    if display is None:
        return {}
    return {p: getattr(display, f"GetSegment{p}")(segment_id) for p in _DISPLAY_PROPERTIES}


def _restore_display(seg_node, segment_id: str, state: dict) -> None:
    display = seg_node.GetDisplayNode()
    for prop, value in state.items():
        getattr(display, f"SetSegment{prop}")(segment_id, value)


def _set_metadata(segment, source: Segment, name: str) -> None:
    segment.SetName(name)
    segment.SetColor(*(float(c) for c in source.color))
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    if source.terminology:
        segment.SetTag(segment.GetTerminologyEntryTagName(), source.terminology)
