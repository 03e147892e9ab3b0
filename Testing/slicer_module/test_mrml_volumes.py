"""The MRML bridge for volumes, against Slicer's real MRML (the slicer-core wheel) on a real vtkMRMLScene.

Voxels are checked with Slicer's own exporter (vtkSlicerSegmentationsModuleLogic::
ExportSegmentsToLabelmapNode) as the independent oracle wherever the bridge writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mrml_oracle import HAVE_MRML, constant_warp, ijk_to_ras_of, linear_transform, translation_matrix
from phantoms import OBLIQUE, RAS_FLIP, phantom, rotation
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import Volume

pytestmark = pytest.mark.skipif(not HAVE_MRML, reason="Slicer's MRML is not importable (pip install slicer-core)")

if HAVE_MRML:
    import slicer
    import vtk
    from vtkmodules.util.numpy_support import vtk_to_numpy

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


# --- a DICOM series under the DICOM plugin's acquisition transform ----------------------------------

def _acquisition_transform(scene, node, positions_lps: np.ndarray):
    """The transform Slicer's DICOM plugin adds (DICOMScalarVolumePlugin.AcquisitionModeling, 5.10:
    gridTransformFromCorners, sliceCornersFromIJKToRAS, sliceCornersFromDICOM), made as it makes it:
    one displacement per slice corner, from the corner on the volume's grid to where that slice was
    acquired; with the volume's DICOM.instanceUIDs that the plugin reads the positions through."""
    columns, rows, slices = node.GetImageData().GetDimensions()
    ijk_to_ras = ijk_to_ras_of(node)
    corners = np.array([[[[c * columns, r * rows, k, 1.0] for c in range(2)] for r in range(2)] for k in range(slices)])
    source = (corners @ ijk_to_ras.T)[..., :3]
    origins = positions_lps * (-1.0, -1.0, 1.0)  # ImagePositionPatient in RAS; the slices keep their orientation
    target = origins[:, None, None, :] + source - source[:, :1, :1, :]
    grid = vtk.vtkImageData()
    grid.SetOrigin(*node.GetOrigin())
    grid.SetDimensions(2, 2, slices)
    spacing = node.GetSpacing()
    grid.SetSpacing(spacing[0] * columns, spacing[1] * rows, spacing[2])
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    vtk_to_numpy(grid.GetPointData().GetScalars())[:] = (target - source).reshape(-1, 3)
    transform = slicer.vtkOrientedGridTransform()
    direction = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(direction)
    transform.SetGridDirectionMatrix(direction)
    transform.SetDisplacementGridData(grid)
    transform_node = slicer.vtkMRMLGridTransformNode()
    transform_node.SetName(scene.GenerateUniqueName(node.GetName() + " acquisition transform"))
    scene.AddNode(transform_node)
    transform_node.SetAndObserveTransformToParent(transform)
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    node.SetAttribute("DICOM.instanceUIDs", " ".join(f"1.2.3.{k}" for k in range(slices)))
    moved = [0.0, 0.0, 0.0]
    for k in range(slices):  # the plugin's own check (cornersToWorld)
        node.TransformPointToWorld(list(source[k, 1, 1]), moved)
        assert np.allclose(moved, target[k, 1, 1], atol=1e-6)
    return transform_node


def _tilted_uneven_series():
    """A series acquired with a 12 degree gantry tilt and uneven gaps (2, 3 and 1 mm): the volume ITK
    stacks (first slice's position, (last - first) / (n - 1) apart) and each slice's ImagePositionPatient."""
    rng = np.random.default_rng(7)
    along = np.array([0.0, 2.0, 4.0, 7.0, 9.0, 11.0, 13.0, 14.0])
    k, j, i = np.meshgrid(np.arange(8), np.arange(14), np.arange(12), indexing="ij")
    array = (100 + 7 * i + 11 * j + 13 * k + rng.integers(0, 30, size=k.shape)).astype(np.int16)  # never 0
    volume = Volume(array, (0.7, 0.8, along[-1] / 7), (10.0, -5.0, 3.0), OBLIQUE)
    axes = volume.direction_matrix
    tilt = np.tan(np.radians(12)) * along  # each slice shifted along the column axis
    positions = np.asarray(volume.origin) + along[:, None] * axes[:, 2] + tilt[:, None] * axes[:, 1]
    return volume, positions


def test_a_dicom_acquisition_transform_is_read_on_the_clis_regular_grid(scene):
    """One rule for the CLI and the panel: the volume Slicer's DICOM plugin left under its acquisition
    transform is read as hardening it gives (scene unchanged, a note for the report), and that is the
    grid and the voxels io/dicom_series.regularized gives for the same series (within one grey level:
    both interpolate linearly, VTK inverting the grid transform iteratively)."""
    import SimpleITK as sitk

    from SAM2FewShotLib.io.dicom_series import RULE, regularized

    volume, positions = _tilted_uneven_series()
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    cli_image, cli_note = regularized(image, positions, Path("series"), "1.2.3")
    cli = Volume(sitk.GetArrayFromImage(cli_image), cli_image.GetSpacing(), cli_image.GetOrigin(),
                 cli_image.GetDirection())

    node = volume_to_node(volume, scene, "CT")
    transform_node = _acquisition_transform(scene, node, positions)
    stored, nodes = node.GetImageData(), scene.GetNumberOfNodes()
    notes: list[dict] = []
    panel = volume_from_node(node, notes=notes)  # no "harden it first"

    assert cli.array.shape == (8, 18, 12) and panel.same_grid(cli, tol=1e-4)  # the tilt widened the grid
    acquired = cli.array != 0  # where the CLI samples the acquired slices (outside: no data, 0)
    assert acquired.mean() > 0.7  # 14 of 18 rows hold a slice
    assert np.abs(panel.array[acquired].astype(int) - cli.array[acquired]).max() <= 1
    corners = np.sort(volume.array[np.ix_([0, -1], [0, -1], [0, -1])].ravel())
    assert np.all(panel.array[~acquired] == corners[3])  # Slicer's background: the median of the corner voxels
    [note] = notes
    assert note["rule"] == RULE and (note["volume"], note["transform"]) == ("CT", "CT acquisition transform")
    figures = ("acquired_slices", "slices", "spacing_mm", "smallest_gap_mm", "largest_gap_mm", "largest_shift_mm")
    assert [note[f] for f in figures] == pytest.approx([cli_note[f] for f in figures], abs=1e-5)
    # node and scene as they were
    assert node.GetImageData() is stored and np.array_equal(volume_from_node(node, harden=True).array, panel.array)
    assert np.array_equal(vtk_to_numpy(stored.GetPointData().GetScalars()).reshape(volume.array.shape), volume.array)
    assert np.allclose(ijk_to_ras_of(node), volume.ijk_to_ras(), atol=1e-9)
    assert node.GetParentTransformNode() is transform_node and scene.GetNumberOfNodes() == nodes


@pytest.mark.parametrize("change", ["user's own grid", "renamed", "no DICOM UIDs", "a transform above",
                                    "edited lattice"])
def test_other_transforms_keep_their_harden_it_first(scene, change):
    """Only the plugin's transform, as it makes it, is read hardened by itself; any other keeps today's refusal."""
    volume, positions = _tilted_uneven_series()
    node = volume_to_node(volume, scene, "CT")
    transform_node = _acquisition_transform(scene, node, positions)
    if change == "user's own grid":
        node.SetAndObserveTransformNodeID(constant_warp(scene, (1.0, 2.0, 3.0)).GetID())
    elif change == "renamed":
        transform_node.SetName("my registration")
    elif change == "no DICOM UIDs":
        node.RemoveAttribute("DICOM.instanceUIDs")
    elif change == "a transform above":
        transform_node.SetAndObserveTransformNodeID(linear_transform(scene, translation_matrix(5, 0, 0)).GetID())
    else:
        transform_node.GetTransformToParent().GetDisplacementGrid().SetSpacing(1.0, 1.0, 2.0)
    notes: list[dict] = []
    with pytest.raises(InputError, match="harden it first"):
        volume_from_node(node, notes=notes)
    assert notes == [] and volume_from_node(node, harden=True, notes=notes).array.size and notes == []
