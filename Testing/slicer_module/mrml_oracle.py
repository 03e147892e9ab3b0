"""MRML done the plain Slicer way, independent of the bridge (SAM2FewShotLib.slicer.mrml_*): Slicer's own
exporter (vtkSlicerSegmentationsModuleLogic::ExportSegmentsToLabelmapNode) as the oracle for voxels, and
the transforms and label maps the bridge's tests move around. Needs slicer-core (callers skip without it).
"""

from __future__ import annotations

import numpy as np
import pytest

from phantoms import OBLIQUE, phantom, rotation
from SAM2FewShotLib.io.volume import LabelMap, Segment, Volume

try:
    import slicer

    HAVE_MRML = hasattr(slicer, "vtkMRMLScene")
except ImportError:
    HAVE_MRML = False



def require_mrml():
    """Slicer's ``slicer`` module with its MRML classes (slicer-core), or the calling test (or test module, when
    called at its top) skipped saying what to install."""
    slicer = pytest.importorskip("slicer", reason="Slicer's MRML is not importable (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' module found has no MRML classes (pip install slicer-core)", allow_module_level=True)
    return slicer


if HAVE_MRML:
    import vtk
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy

LIVER_TERM = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
              "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")


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
    for segment_id, name in zip(new_ids, names, strict=True):
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


def translation_matrix(di: float, dj: float, dk: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = (di, dj, dk)
    return matrix


def named_labels(direction=OBLIQUE, n_objects=3) -> tuple[Volume, LabelMap]:
    image, labels = phantom(direction=direction, n_objects=n_objects)
    segments = [Segment(1, "liver", (0.86, 0.38, 0.26), LIVER_TERM), Segment(2, "spleen", (0.2, 0.5, 0.9))]
    segments += [Segment(v, f"organ {v}", (0.1 * v, 0.2, 0.3)) for v in range(3, n_objects + 1)]
    return image, LabelMap(labels.volume, tuple(segments))


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
