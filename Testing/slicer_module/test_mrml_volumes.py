"""The MRML bridge for volumes, against Slicer's real MRML (the slicer-core wheel) on a real vtkMRMLScene.

Voxels are checked with Slicer's own exporter (vtkSlicerSegmentationsModuleLogic::
ExportSegmentsToLabelmapNode) as the independent oracle wherever the bridge writes.
"""

from __future__ import annotations

import numpy as np
import pytest

from mrml_oracle import HAVE_MRML, constant_warp, ijk_to_ras_of, linear_transform, translation_matrix
from phantoms import OBLIQUE, RAS_FLIP, phantom, rotation
from SAM2FewShotLib.common.errors import InputError

pytestmark = pytest.mark.skipif(not HAVE_MRML, reason="Slicer's MRML is not importable (pip install slicer-core)")

if HAVE_MRML:
    import slicer
    import vtk

    from SAM2FewShotLib.slicer.mrml_segments import (
        register_segmentation_converters,
    )
    from SAM2FewShotLib.slicer.mrml_volume import volume_from_node, volume_to_node



@pytest.fixture
def scene():
    register_segmentation_converters()  # before any segmentation node exists: its converter copies the rules
    return slicer.vtkMRMLScene()


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




def test_non_scalar_nodes_are_refused(scene):
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    with pytest.raises(InputError, match="scalar volume"):
        volume_from_node(seg_node)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        volume_from_node(empty)
