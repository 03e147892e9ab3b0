"""The MRML bridge against Slicer's real MRML (the slicer-core wheel) on a real vtkMRMLScene.

Voxels are checked with Slicer's own exporter (vtkSlicerSegmentationsModuleLogic::
ExportSegmentsToLabelmapNode) as the independent oracle wherever the bridge writes.
"""

from __future__ import annotations

import numpy as np
import pytest
from phantoms import OBLIQUE, RAS_FLIP, phantom, rotation
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap, Segment, Volume

try:
    import slicer

    HAVE_MRML = hasattr(slicer, "vtkMRMLScene")
except ImportError:
    HAVE_MRML = False

pytestmark = pytest.mark.skipif(not HAVE_MRML, reason="Slicer's MRML is not importable (pip install slicer-core)")

if HAVE_MRML:
    import vtk
    from SAM2FewShotLib.slicer.mrml_segments import (
        add_labels_to_segmentation,
        labels_from_segmentation,
        register_segmentation_converters,
        segmentation_geometry_matches,
    )
    from SAM2FewShotLib.slicer.mrml_volume import volume_from_node, volume_to_node
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy

LIVER_TERM = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"


@pytest.fixture
def scene():
    register_segmentation_converters()  # before any segmentation node exists: its converter copies the rules
    return slicer.vtkMRMLScene()


# --- helpers: MRML done the plain Slicer way, independent of the bridge ----------------------------

def ijk_to_ras_of(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def exported(scene, seg_node, segment_ids, reference_node) -> np.ndarray:
    """Slicer's own export of the segments (values 1..N in that order) on the reference grid."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "oracle")
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        seg_node, ids, labelmap, reference_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    image = labelmap.GetImageData()
    i, j, k = image.GetDimensions()
    out = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i).copy()
    scene.RemoveNode(labelmap)
    return out


def mask_of(scene, seg_node, segment_id, reference_node) -> np.ndarray:
    return exported(scene, seg_node, [segment_id], reference_node) > 0


def import_user_segments(seg_node, array: np.ndarray, volume: Volume, names: list[str]) -> list[str]:
    """Segments made by Slicer's labelmap import (one shared layer), renamed like a user's."""
    image = slicer.vtkOrientedImageData()
    k, j, i = array.shape
    image.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(array, dtype=np.uint8).ravel(), deep=True))
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, volume.ijk_to_ras()[r, c])
    image.SetGeometryFromImageToWorldMatrix(m)
    segmentation = seg_node.GetSegmentation()
    before = set(segmentation.GetSegmentIDs())
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, seg_node, "user", "")
    new_ids = [s for s in segmentation.GetSegmentIDs() if s not in before]
    for segment_id, name in zip(new_ids, names):
        segmentation.GetSegment(segment_id).SetName(name)
    return new_ids


def segment_names(seg_node) -> list[str]:
    segmentation = seg_node.GetSegmentation()
    return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]


def linear_transform(scene, matrix: np.ndarray):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, matrix[r, c])
    node.SetMatrixTransformToParent(m)
    return node


def constant_warp(scene, shift_ras):
    """A non-linear (grid) transform node that moves everything by ``shift_ras`` millimetres."""
    grid = vtk.vtkImageData()
    grid.SetOrigin(-120.0, -120.0, -120.0)
    grid.SetSpacing(20.0, 20.0, 20.0)
    grid.SetDimensions(13, 13, 13)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    vtk_to_numpy(grid.GetPointData().GetScalars())[:] = shift_ras
    warp = slicer.vtkOrientedGridTransform()
    warp.SetDisplacementGridData(grid)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformToParent(warp)
    assert not node.IsTransformToWorldLinear()
    return node


def moved_labels(labels: np.ndarray, ijk_to_ras: np.ndarray, local_to_world: np.ndarray) -> np.ndarray:
    """Where labels stored on the grid in a node's local frame appear on the same grid in world.

    For transforms that map voxel centres onto voxel centres (whole-voxel shifts, 90-degree turns).
    """
    k, j, i = labels.shape
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    source = np.linalg.inv(ijk_to_ras) @ np.linalg.inv(local_to_world) @ ijk_to_ras @ ijk
    assert np.allclose(source, np.round(source), atol=1e-6)
    si, sj, sk = np.round(source[:3]).astype(int)
    inside = (si >= 0) & (si < i) & (sj >= 0) & (sj < j) & (sk >= 0) & (sk < k)
    out = np.zeros(labels.size, dtype=labels.dtype)
    out[inside] = labels[sk[inside], sj[inside], si[inside]]
    return out.reshape(labels.shape)


# --- volumes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", [np.eye(3), RAS_FLIP, OBLIQUE], ids=["lps", "ras", "oblique"])
def test_volume_round_trip_is_exact(scene, direction):
    image, _ = phantom(direction=direction)
    node = volume_to_node(image, scene, "query")
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetScene() is scene
    assert node.GetImageData().GetDimensions() == image.shape_ijk
    assert np.allclose(ijk_to_ras_of(node), image.ijk_to_ras(), atol=1e-6)
    back = volume_from_node(node)
    assert back.array.dtype == image.array.dtype
    assert np.array_equal(back.array, image.array)
    assert np.allclose(back.spacing, image.spacing, atol=1e-6)
    assert np.allclose(back.origin, image.origin, atol=1e-6)
    assert np.allclose(back.direction, image.direction, atol=1e-6)
    assert back.array is not image.array


def test_volume_to_node_updates_an_existing_node(scene):
    first, _ = phantom(shape_kji=(6, 20, 24))
    second, _ = phantom(shape_kji=(8, 16, 18), spacing=(1.5, 1.5, 3.0), direction=OBLIQUE, seed=3)
    node = volume_to_node(first, scene, "query")
    again = volume_to_node(second, scene, "ignored", node=node)
    assert again is node and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    back = volume_from_node(node)
    assert np.array_equal(back.array, second.array) and back.same_grid(second, tol=1e-6)


def test_display_windowing_does_not_change_voxels(scene):
    image, _ = phantom()
    node = volume_to_node(image, scene, "query")
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(10.0, 500.0)
    assert np.array_equal(volume_from_node(node).array, image.array)


def test_volume_under_a_transform_must_be_hardened_or_is_hardened_on_request(scene):
    image, _ = phantom(direction=OBLIQUE)
    node = volume_to_node(image, scene, "query")
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation("x", 30)
    to_parent[:3, 3] = (5.0, -2.0, 7.5)
    node.SetAndObserveTransformNodeID(linear_transform(scene, to_parent).GetID())
    with pytest.raises(InputError, match="harden"):
        volume_from_node(node)
    hardened = volume_from_node(node, harden=True)
    assert np.array_equal(hardened.array, image.array)
    assert np.allclose(hardened.ijk_to_ras(), to_parent @ image.ijk_to_ras(), atol=1e-6)
    assert np.allclose(ijk_to_ras_of(node), image.ijk_to_ras(), atol=1e-9)  # the node is untouched
    other, _ = phantom(direction=RAS_FLIP, seed=5)
    volume_to_node(other, scene, "ignored", node=node)  # written so that it lands right in world
    assert volume_from_node(node, harden=True).same_grid(other, tol=1e-6)


def test_non_linear_transform_is_resampled_on_request(scene):
    image, _ = phantom(shape_kji=(8, 20, 24), spacing=(1.0, 1.0, 2.0))
    node = volume_to_node(image, scene, "query")
    shift = np.array([2.0, -3.0, 4.0])  # RAS mm: whole voxels along i, j and k
    transform_node = constant_warp(scene, shift)
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    with pytest.raises(InputError, match="harden"):
        volume_from_node(node)
    hardened = volume_from_node(node, harden=True)
    # Every voxel of the hardened volume shows the original voxel that the warp moved there.
    k, j, i = np.nonzero(hardened.array > 250)
    ijk = np.stack([i, j, k, np.ones(i.size)])
    world = hardened.ijk_to_ras() @ ijk
    world[:3] -= shift[:, None]
    src = np.round(np.linalg.inv(image.ijk_to_ras()) @ world).astype(int)
    assert i.size > 100
    assert np.allclose(hardened.array[k, j, i], image.array[src[2], src[1], src[0]], atol=1e-3)


def test_image_extent_not_starting_at_zero_keeps_voxel_positions(scene):
    image, _ = phantom(direction=OBLIQUE)
    node = volume_to_node(image, scene, "query")
    shifted = vtk.vtkImageData()
    shifted.DeepCopy(node.GetImageData())
    i, j, k = shifted.GetDimensions()
    shifted.SetExtent(2, i + 1, 3, j + 2, 1, k)  # same voxels, indexed from IJK (2, 3, 1)
    node.SetAndObserveImageData(shifted)
    back = volume_from_node(node)
    assert np.array_equal(back.array, image.array)
    assert np.allclose(back.ijk_to_ras(), image.ijk_to_ras() @ translation_matrix(2, 3, 1), atol=1e-6)


def test_integer_and_boolean_arrays_are_stored_in_vtk_types(scene):
    image, labels = phantom()
    wide = labels.volume.with_array(labels.volume.array.astype(np.int64) * 1000)
    node = volume_to_node(wide, scene, "wide")
    assert node.GetImageData().GetScalarType() == vtk.VTK_INT
    assert np.array_equal(volume_from_node(node).array, wide.array)
    flags = volume_to_node(labels.volume.with_array(labels.volume.array > 0), scene, "flags")
    assert np.array_equal(volume_from_node(flags).array, (labels.volume.array > 0).astype(np.uint8))


def translation_matrix(di: float, dj: float, dk: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = (di, dj, dk)
    return matrix


def test_non_scalar_nodes_are_refused(scene):
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    with pytest.raises(InputError, match="scalar volume"):
        volume_from_node(seg_node)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        volume_from_node(empty)


# --- label maps -> segments ------------------------------------------------------------------------

def named_labels(direction=OBLIQUE, n_objects=3) -> tuple[Volume, LabelMap]:
    image, labels = phantom(direction=direction, n_objects=n_objects)
    segments = [Segment(1, "liver", (0.86, 0.38, 0.26), LIVER_TERM), Segment(2, "spleen", (0.2, 0.5, 0.9))]
    segments += [Segment(v, f"organ {v}", (0.1 * v, 0.2, 0.3)) for v in range(3, n_objects + 1)]
    return image, LabelMap(labels.volume, tuple(segments))


def test_segments_from_labels_carry_names_colours_terminology_and_exact_voxels(scene):
    image, labels = named_labels()
    query = volume_to_node(image, scene, "query")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    ids = add_labels_to_segmentation(seg_node, labels, query)
    segmentation = seg_node.GetSegmentation()
    assert len(ids) == 3 and list(segmentation.GetSegmentIDs()) == ids
    assert segment_names(seg_node) == ["liver", "spleen", "organ 3"]
    for segment_id, expected in zip(ids, labels.segments):
        segment = segmentation.GetSegment(segment_id)
        assert np.allclose(segment.GetColor(), expected.color)
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        count = int(np.sum(mask_of(scene, seg_node, segment_id, query)))
        assert count == int(np.sum(labels.volume.array == expected.value)) > 0
    term = vtk.reference("")
    assert segmentation.GetSegment(ids[0]).GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), term)
    assert str(term) == LIVER_TERM
    assert np.array_equal(exported(scene, seg_node, ids, query), labels.volume.array)
    assert segmentation_geometry_matches(seg_node, query)  # reference geometry came from the query


@pytest.fixture
def user_scene(scene):
    """A query, and a segmentation where the user drew 'user_edit' and 'liver' (one shared layer)."""
    image, labels = named_labels()
    query = volume_to_node(image, scene, "query")
    user = np.zeros(image.array.shape, np.uint8)
    new_liver = labels.volume.array == 1
    ks, js, is_ = np.nonzero(new_liver)
    user[ks.min():ks.max() + 1, js.min():js.max() + 1, is_.min():is_.min() + 3] = 1  # overlaps the new liver
    user[2:5, 3:9, 30:40] = 2
    user[new_liver & (user == 2)] = 1
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(query)
    edit_id, liver_id = import_user_segments(seg_node, user, image, ["user_edit", "liver"])
    seg_node.GetSegmentation().GetSegment(liver_id).SetColor(0.1, 0.9, 0.1)
    seg_node.GetDisplayNode().SetSegmentVisibility3D(liver_id, False)
    seg_node.GetDisplayNode().SetSegmentOpacity2DFill(liver_id, 0.25)
    before = {s: mask_of(scene, seg_node, s, query) for s in (edit_id, liver_id)}
    assert np.sum(before[edit_id] & new_liver) > 0 and np.sum(before[liver_id]) > 0
    return scene, query, seg_node, labels, edit_id, liver_id, before


@pytest.mark.parametrize("policy", ["keep", "replace", "add"])
def test_existing_segments_are_preserved(user_scene, policy):
    scene, query, seg_node, labels, edit_id, liver_id, before = user_scene
    new_liver = labels.volume.array == 1
    ids = add_labels_to_segmentation(seg_node, labels, query, existing=policy)
    segmentation = seg_node.GetSegmentation()
    assert np.array_equal(mask_of(scene, seg_node, edit_id, query), before[edit_id])
    assert segmentation.GetSegment(edit_id).GetName() == "user_edit"
    liver_now = mask_of(scene, seg_node, liver_id, query)
    assert np.allclose(segmentation.GetSegment(liver_id).GetColor(), (0.1, 0.9, 0.1))
    assert not seg_node.GetDisplayNode().GetSegmentVisibility3D(liver_id)
    assert seg_node.GetDisplayNode().GetSegmentOpacity2DFill(liver_id) == pytest.approx(0.25)
    names = segment_names(seg_node)
    if policy == "keep":
        assert names == ["user_edit", "liver", "spleen", "organ 3"] and liver_id not in ids and len(ids) == 2
        assert np.array_equal(liver_now, before[liver_id])
    elif policy == "replace":
        assert names == ["user_edit", "liver", "spleen", "organ 3"] and ids[0] == liver_id and len(ids) == 3
        assert np.array_equal(liver_now, new_liver)
    else:
        assert names == ["user_edit", "liver", "liver (2)", "spleen", "organ 3"] and liver_id not in ids
        assert np.array_equal(liver_now, before[liver_id])
        assert np.array_equal(mask_of(scene, seg_node, ids[0], query), new_liver)
    spleen_id = segmentation.GetSegmentIdBySegmentName("spleen")
    assert np.array_equal(mask_of(scene, seg_node, spleen_id, query), labels.volume.array == 2)


def test_one_undo_restores_the_previous_segments(user_scene):
    scene, query, seg_node, labels, edit_id, liver_id, before = user_scene
    scene.SetUndoOn()
    undo_levels = scene.GetNumberOfUndoLevels()
    add_labels_to_segmentation(seg_node, labels, query, existing="replace")
    assert scene.GetNumberOfUndoLevels() == undo_levels + 1
    assert segment_names(seg_node) == ["user_edit", "liver", "spleen", "organ 3"]
    scene.Undo()
    assert segment_names(seg_node) == ["user_edit", "liver"]
    for segment_id, mask in before.items():
        assert np.array_equal(mask_of(scene, seg_node, segment_id, query), mask)


def test_bad_policy_touches_nothing(user_scene):
    scene, query, seg_node, labels, edit_id, liver_id, before = user_scene
    with pytest.raises(InputError, match="policy"):
        add_labels_to_segmentation(seg_node, labels, query, existing="merge")
    assert segment_names(seg_node) == ["user_edit", "liver"]
    assert np.array_equal(mask_of(scene, seg_node, liver_id, query), before[liver_id])


# --- segments -> label maps ------------------------------------------------------------------------

@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE], ids=["lps", "oblique"])
def test_labels_segmentation_labels_is_identity(scene, direction):
    image, labels = named_labels(direction)
    query = volume_to_node(image, scene, "query")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    add_labels_to_segmentation(seg_node, labels, query)
    back = labels_from_segmentation(seg_node, image)
    assert back.volume.same_grid(image, tol=1e-9)
    assert np.array_equal(back.volume.array, labels.volume.array)
    assert [(s.value, s.name) for s in back.segments] == [(s.value, s.name) for s in labels.segments]
    assert back.segments[0].terminology == LIVER_TERM
    assert np.allclose([s.color for s in back.segments], [s.color for s in labels.segments])


def test_chosen_segments_in_order_with_empty_segment_kept_and_later_overlap_winning(scene):
    image, labels = named_labels(n_objects=2)
    query = volume_to_node(image, scene, "query")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    liver_id, spleen_id = add_labels_to_segmentation(seg_node, labels, query)
    blob = np.zeros(image.array.shape, np.uint8)
    blob[:, :20, :] = 1  # overlaps the liver, not the spleen
    (blob_id,) = import_user_segments(seg_node, blob, image, ["blob"])
    (empty_id,) = add_labels_to_segmentation(
        seg_node, LabelMap(labels.volume.with_array(np.zeros_like(blob)), (Segment(1, "empty"),)), query
    )
    liver, spleen = labels.volume.array == 1, labels.volume.array == 2
    got = labels_from_segmentation(seg_node, image, [spleen_id, empty_id, liver_id, blob_id])
    assert [s.name for s in got.segments] == ["spleen", "empty", "liver", "blob"]
    expected = np.zeros(blob.shape, np.uint8)
    expected[spleen], expected[liver], expected[blob == 1] = 1, 3, 4
    assert np.array_equal(got.volume.array, expected)
    got = labels_from_segmentation(seg_node, image, [blob_id, liver_id])
    assert np.sum(got.volume.array == 2) == np.sum(liver)  # liver last: it wins over the blob
    with pytest.raises(InputError, match="no segment"):
        labels_from_segmentation(seg_node, image, ["nope"])
    fresh = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "fresh")
    blank_id = fresh.GetSegmentation().AddEmptySegment("", "blank")  # Slicer's empty image: no extent
    got = labels_from_segmentation(fresh, image)
    assert [s.name for s in got.segments] == ["blank"] and not got.volume.array.any()
    assert got.volume.same_grid(image) and blank_id


def test_segmentation_on_another_grid_lands_on_the_query_voxels(scene):
    image, labels = named_labels(OBLIQUE)
    query = volume_to_node(image, scene, "query")
    array = labels.volume.array
    # (a) stored on a cropped grid that cuts through the structures
    crop = (slice(2, 10), slice(8, 30), slice(10, 40))
    lps = image.ijk_to_lps()
    crop_origin = (lps @ [crop[2].start, crop[1].start, crop[0].start, 1.0])[:3]
    crop_volume = Volume(array[crop], image.spacing, crop_origin, image.direction)
    crop_node = volume_to_node(Volume(image.array[crop], image.spacing, crop_origin, image.direction), scene, "crop")
    cropped = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "cropped")
    add_labels_to_segmentation(cropped, LabelMap(crop_volume, labels.segments), crop_node)
    assert not segmentation_geometry_matches(cropped, query) and segmentation_geometry_matches(cropped, crop_node)
    expected = np.zeros_like(array)
    expected[crop] = array[crop]
    assert 0 < np.sum(expected > 0) < np.sum(array > 0)
    assert np.array_equal(labels_from_segmentation(cropped, image).volume.array, expected)
    # (b) stored at half the spacing: every query voxel centre is a fine voxel centre
    fine_array = array.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine = Volume(fine_array, tuple(s / 2 for s in image.spacing), image.origin, image.direction)
    fine_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "fine")
    add_labels_to_segmentation(fine_seg, LabelMap(fine, labels.segments), None)
    assert np.array_equal(labels_from_segmentation(fine_seg, image).volume.array, array)


def translation_by_voxels(image: Volume, di: int, dj: int, dk: int) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = image.ijk_to_ras()[:3, :3] @ [di, dj, dk]
    return matrix


def quarter_turn_about_voxel(image: Volume, centre_ijk) -> np.ndarray:
    """A 90-degree rotation about the K axis through a voxel centre (needs equal I and J spacing)."""
    ijk_to_ras = image.ijk_to_ras()
    turn = np.eye(4)
    turn[:3, :3] = rotation("z", 90)  # in IJK: i -> j, j -> -i
    centre = np.eye(4)
    centre[:3, 3] = centre_ijk
    return ijk_to_ras @ centre @ turn @ np.linalg.inv(centre) @ np.linalg.inv(ijk_to_ras)


def shear_by_voxels(image: Volume) -> np.ndarray:
    """A shear that moves each voxel by one voxel along I per voxel along K."""
    ijk_to_ras = image.ijk_to_ras()
    shear = np.eye(4)
    shear[0, 2] = 1.0
    return ijk_to_ras @ shear @ np.linalg.inv(ijk_to_ras)


@pytest.mark.parametrize("motion", ["translation", "quarter_turn", "shear", "grid_warp"])
def test_transformed_segmentation_lands_on_the_right_query_voxels(scene, motion):
    image, labels = named_labels(OBLIQUE)
    image = Volume(image.array, (0.9, 0.9, 2.5), image.origin, image.direction)  # square voxels in-plane
    labels = LabelMap(Volume(labels.volume.array, image.spacing, image.origin, image.direction), labels.segments)
    query = volume_to_node(image, scene, "query")
    if motion == "quarter_turn":
        matrix = quarter_turn_about_voxel(image, (24, 20, 0))
    elif motion == "shear":
        matrix = shear_by_voxels(image)
    else:
        matrix = translation_by_voxels(image, 3, -2, 1)
    transform = constant_warp(scene, matrix[:3, 3]) if motion == "grid_warp" else linear_transform(scene, matrix)
    # Reading: segments drawn on the query grid, then the node is moved.
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moved")
    add_labels_to_segmentation(seg_node, labels, query)
    seg_node.SetAndObserveTransformNodeID(transform.GetID())
    expected = moved_labels(labels.volume.array, image.ijk_to_ras(), matrix)
    assert np.sum(expected > 0) > 0.5 * np.sum(labels.volume.array > 0)
    assert not np.array_equal(expected, labels.volume.array)
    assert np.array_equal(labels_from_segmentation(seg_node, image).volume.array, expected)
    # Writing: into a node that is already moved, the labels land where they are in world.
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "target")
    target.SetAndObserveTransformNodeID(seg_node.GetTransformNodeID())
    ids = add_labels_to_segmentation(target, labels, query)
    assert np.array_equal(labels_from_segmentation(target, image).volume.array, labels.volume.array)
    if motion != "grid_warp":
        # Slicer's exporter sizes a non-linearly moved oblique grid from two corners and clips it.
        assert np.array_equal(exported(scene, target, ids, query), labels.volume.array)
    target.SetAndObserveTransformNodeID(None)  # what was stored: the labels moved back
    stored = labels_from_segmentation(target, image).volume.array
    assert np.array_equal(stored, moved_labels(labels.volume.array, image.ijk_to_ras(), np.linalg.inv(matrix)))


def test_closed_surface_segmentation_is_voxelised_on_the_query_grid(scene):
    image, _ = phantom(shape_kji=(16, 40, 40), spacing=(1.0, 1.0, 1.0))
    query = volume_to_node(image, scene, "query")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surface")
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(query)
    seg_node.SetSourceRepresentationToClosedSurface()
    centre = (image.ijk_to_ras() @ [20, 20, 8, 1])[:3]
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*centre)
    sphere.SetRadius(6.0)
    sphere.SetThetaResolution(48)
    sphere.SetPhiResolution(48)
    sphere.Update()
    seg_node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball", [1.0, 0.0, 0.0])
    assert seg_node.GetSegmentation().GetSourceRepresentationName() == "Closed surface"
    got = labels_from_segmentation(seg_node, image)
    assert got.segments[0].name == "ball" and got.volume.array[8, 20, 20] == 1
    assert abs(np.sum(got.volume.array) - 4 / 3 * np.pi * 6.0**3) < 0.1 * 4 / 3 * np.pi * 6.0**3
