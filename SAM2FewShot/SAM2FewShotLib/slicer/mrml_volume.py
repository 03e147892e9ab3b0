"""Scalar volume nodes <-> Volume, with exact geometry (MRML's IJKToRAS <-> our LPS).

Only Slicer's MRML and VTK classes are used (never Qt, never slicer.util helpers that need the
application), so the same code runs inside 3D Slicer and headless with the ``slicer-core`` wheel.
The MRML classes come from the ``slicer`` module in both; it is imported lazily so that the rest
of the engine never needs it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from ..common.errors import InputError
from ..io.dicom_series import CORNER_TOLERANCE_MM, RULE
from ..io.volume import Volume

log = logging.getLogger(__name__)

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_VTK_SAFE_DTYPES = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "float32", "float64"}


def mrml() -> Any:
    """The ``slicer`` module with its MRML classes (3D Slicer's own, or the slicer-core wheel's)."""
    try:
        import slicer
    except ImportError as exc:
        raise ImportError(
            "Slicer's MRML classes are needed: run inside 3D Slicer or `pip install slicer-core`"
        ) from exc
    if not hasattr(slicer, "vtkMRMLScene"):
        raise ImportError(
            f"the 'slicer' module at {getattr(slicer, '__file__', '?')} has no MRML classes: "
            "run inside 3D Slicer or `pip install slicer-core`"
        )
    return slicer


# --- matrices ---------------------------------------------------------------------------------

def matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def numpy_to_matrix(array: np.ndarray):
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_ijk_to_ras(node) -> np.ndarray:
    """The node's own IJKToRAS (its parent transform not applied)."""
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def linear_to_world(node) -> np.ndarray | None:
    """The node-to-world matrix of its parent transforms (identity without one), None if non-linear."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        return None
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return matrix_to_numpy(matrix)


def volume_from_ijk_to_ras(array: np.ndarray, ijk_to_ras: np.ndarray) -> Volume:
    """A Volume whose voxel (i, j, k) sits where ``ijk_to_ras`` puts it."""
    lps = _LPS_FROM_RAS @ ijk_to_ras
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"degenerate IJK-to-RAS matrix (spacing {tuple(spacing)})")
    direction = tuple((axes / spacing).ravel())
    return Volume(array, spacing=tuple(spacing), origin=tuple(lps[:3, 3]), direction=direction)


# --- VTK images ----------------------------------------------------------------------------------

def array_from_image(image) -> np.ndarray:
    """A (k, j, i) copy of a single-component vtkImageData's voxels."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    shape = (k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    if min(shape) <= 0 or image.GetPointData().GetScalars() is None:
        return np.zeros((max(shape[0], 0), max(shape[1], 0), max(shape[2], 0)), dtype=np.uint8)
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape).copy()


def fill_image(image, array: np.ndarray, start_ijk: tuple[int, int, int] = (0, 0, 0)) -> None:
    """Give ``image`` the voxels of ``array`` (k, j, i) at extent starting from ``start_ijk``."""
    from vtkmodules.util.numpy_support import numpy_to_vtk

    k, j, i = array.shape
    i0, j0, k0 = start_ijk
    image.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    scalars = numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)


def vtk_safe(array: np.ndarray) -> np.ndarray:
    """The array in a voxel type Slicer displays and saves (bool -> uint8, 64-bit ints narrowed)."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.name in _VTK_SAFE_DTYPES:
        return array
    if array.dtype.kind in "iu":
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dtype in (np.int32, np.uint32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return array.astype(dtype)
    raise InputError(f"voxel type {array.dtype} cannot be stored in a Slicer volume")


# --- public API -----------------------------------------------------------------------------------

def volume_from_node(node, harden: bool = False, notes: list[dict] | None = None) -> Volume:
    """A scalar volume node's voxels (copied, display windowing ignored) with world geometry.

    A node under a parent transform raises InputError unless ``harden`` is True; then a linear
    transform is folded into the geometry (voxels untouched) and a non-linear one is applied to a
    copy outside the scene by Slicer's own hardening (resampled), leaving node and scene unchanged.
    The one exception is the DICOM plugin's acquisition transform (``acquisition_transform``): such
    a volume is always read hardened, on the regular grid the CLI reads the same series on
    (io/dicom_series.py), and a note for the report's input_notes is appended to ``notes``.
    """
    _require_scalar_volume(node)
    parent = node.GetParentTransformNode()
    acquisition = acquisition_transform(node)
    note = _acquisition_note(node, acquisition) if acquisition is not None else None
    if parent is not None and not harden and acquisition is None:
        raise InputError(
            f"volume '{node.GetName()}' is under the transform '{parent.GetName()}': harden it first "
            "(Data module: right-click, Harden transform)"
        )
    to_world = linear_to_world(node)
    if to_world is None:
        image, ijk_to_ras = _resampled_to_world(node)
    else:
        image, ijk_to_ras = node.GetImageData(), to_world @ node_ijk_to_ras(node)
    # Voxel 0 of the array is the first voxel of the extent, which need not be IJK (0, 0, 0).
    i0, _, j0, _, k0, _ = image.GetExtent()
    ijk_to_ras[:, 3] = ijk_to_ras @ np.array([i0, j0, k0, 1.0])
    volume = volume_from_ijk_to_ras(array_from_image(image), ijk_to_ras)
    if note is not None:
        note["slices"] = volume.array.shape[0]
        log.warning("volume '%s' lies under its DICOM acquisition transform '%s' (unevenly spaced slices or a "
                    "tilted gantry): read on a regular grid of %d slices %.4g mm apart by linear interpolation "
                    "between the acquired slices, as Slicer's Harden transform does; the scene is not changed "
                    "(the report's input_notes records it)", note["volume"], note["transform"], note["slices"],
                    note["spacing_mm"])
        if notes is not None:
            notes.append(note)
    return volume


def volume_to_node(volume: Volume, scene, name: str, node=None):
    """Create (or update ``node``) a vtkMRMLScalarVolumeNode holding ``volume`` exactly.

    The node's IJKToRAS is written so that the voxels land at the Volume's world positions, also
    when an existing node sits under a linear transform.
    """
    array = vtk_safe(np.asarray(volume.array))
    if node is None:
        if scene is None:
            raise InputError("a scene is needed to create a volume node")
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        created = True
    else:
        require_node(node, "vtkMRMLScalarVolumeNode", "volume")
        created = False
    to_world = linear_to_world(node)
    if to_world is None:
        raise InputError(f"volume '{node.GetName()}' is under a non-linear transform: harden it first")
    ijk_to_ras = np.linalg.inv(to_world) @ volume.ijk_to_ras()
    from vtkmodules.vtkCommonDataModel import vtkImageData

    image = vtkImageData()
    fill_image(image, array)
    was_modifying = node.StartModify()
    try:
        node.SetAndObserveImageData(image)
        node.SetIJKToRASMatrix(numpy_to_matrix(ijk_to_ras))
        if created or node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
    finally:
        node.EndModify(was_modifying)
    return node


def require_node(node, class_name: str, what: str) -> None:
    if node is None or not node.IsA(class_name):
        got = "nothing" if node is None else f"'{node.GetName()}' ({node.GetClassName()})"
        raise InputError(f"expected a {what} node, got {got}")


def _require_scalar_volume(node) -> None:
    require_node(node, "vtkMRMLScalarVolumeNode", "scalar volume")
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume '{node.GetName()}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"volume '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "a scalar (single-component) volume is needed"
        )


def _resampled_to_world(node):
    """Slicer's hardening of a non-linear transform (vtkMRMLTransformableNode::HardenTransform), applied to a
    copy in a scene of its own. The copy's parent carries the node's transform to world because
    vtkMRMLVolumeNode::ApplyNonLinearTransform sizes its output from the parent transform: without
    one, what the warp moves beyond the original extent (a tilted gantry's shifted slices) is cut off."""
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkCommonTransforms import vtkGeneralTransform

    scene = mrml().vtkMRMLScene()
    to_world = vtkGeneralTransform()
    node.GetParentTransformNode().GetTransformToWorld(to_world)
    parent = scene.AddNewNodeByClass("vtkMRMLTransformNode", "to world")
    parent.SetAndObserveTransformToParent(to_world)
    copy = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "copy")
    image = vtkImageData()
    image.DeepCopy(node.GetImageData())
    copy.SetAndObserveImageData(image)
    copy.SetIJKToRASMatrix(numpy_to_matrix(node_ijk_to_ras(node)))
    copy.SetAndObserveTransformNodeID(parent.GetID())
    copy.HardenTransform()
    return copy.GetImageData(), node_ijk_to_ras(copy)


# --- the DICOM plugin's acquisition transform ---------------------------------------------------------

# Slicer's DICOM scalar volume plugin (Modules/Scripted/DICOMPlugins/DICOMScalarVolumePlugin.py, 5.10:
# AcquisitionModeling.createAcquisitionTransform and gridTransformFromCorners) regularizes a series whose
# slices are off ITK's grid with a vtkMRMLGridTransformNode named GenerateUniqueName(volume name +
# " acquisition transform") as the volume's parent, left unhardened unless the DICOM setting "Acquisition
# geometry regularization" says "harden regularization transform". It sets no attribute on the transform,
# so it is recognised by everything the plugin does: that name, the volume's DICOM.instanceUIDs with one
# UID per slice (without them the plugin makes no transform), and a vtkOrientedGridTransform to parent with
# one lattice node per slice corner (2 x 2 x slices from the volume's origin, along its axes, spacing times
# columns and rows), nothing above it. Any other transform, the user's own, keeps its "harden it first".
_ACQUISITION_NAME = re.compile(r" acquisition transform(_\d+)?$")


def acquisition_transform(node) -> Any:
    """The DICOM plugin's acquisition transform that is ``node``'s parent (see above), else None."""
    parent = node.GetParentTransformNode()
    image = node.GetImageData()
    if (parent is None or image is None or not parent.IsA("vtkMRMLGridTransformNode")
            or parent.GetParentTransformNode() is not None or not _ACQUISITION_NAME.search(parent.GetName() or "")):
        return None
    columns, rows, slices = image.GetDimensions()
    grid_transform = parent.GetTransformToParent()
    if (len((node.GetAttribute("DICOM.instanceUIDs") or "").split()) != slices or grid_transform is None
            or not grid_transform.IsA("vtkOrientedGridTransform")
            or mrml().vtkMRMLTransformNode.IsAbstractTransformComputedFromInverse(grid_transform)):
        return None
    grid, axes = grid_transform.GetDisplacementGrid(), grid_transform.GetGridDirectionMatrix()
    if (grid is None or axes is None or tuple(grid.GetDimensions()) != (2, 2, slices)
            or grid.GetNumberOfScalarComponents() != 3):
        return None
    ijk_to_ras = node_ijk_to_ras(node)
    lattice = np.eye(4)
    lattice[:3, :3] = matrix_to_numpy(axes)[:3, :3] * grid.GetSpacing()
    lattice[:3, 3] = grid.GetOrigin()
    plugin = ijk_to_ras @ np.diag([columns, rows, 1.0, 1.0])  # the plugin's lattice: one node per slice corner
    return parent if np.allclose(lattice, plugin, atol=1e-6 * max(1.0, float(np.abs(plugin).max()))) else None


def _acquisition_note(node, transform_node) -> dict:
    """The report's note, with the figures the CLI's note gives for the same series (io/dicom_series.py;
    "slices" is added once resampled): where each slice was acquired is its first corner on the grid plus
    the plugin's displacement there. Slices acquired at one place are refused, as the CLI refuses them."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    grid = transform_node.GetTransformToParent().GetDisplacementGrid()
    moved = vtk_to_numpy(grid.GetPointData().GetScalars()).reshape(-1, 2, 2, 3)  # [slice][row][column], RAS
    lps = _LPS_FROM_RAS @ node_ijk_to_ras(node)
    spacing = float(np.linalg.norm(lps[:3, 2]))
    slices = np.arange(len(moved))
    positions = (lps[:3, 2] * slices[:, None] + lps[:3, 3]) + moved[:, 0, 0] * _LPS_FROM_RAS.diagonal()[:3]
    normal = lps[:3, 2] / spacing
    gaps = np.diff((positions - positions[0]) @ normal)
    if np.any(gaps <= CORNER_TOLERANCE_MM):
        raise InputError(f"volume '{node.GetName()}': two of its slices were acquired at the same position "
                         "(the DICOM series mixes acquisitions or repeats a file)")
    return {"volume": node.GetName(), "transform": transform_node.GetName(), "rule": RULE,
            "acquired_slices": len(moved), "slices": None, "spacing_mm": round(spacing, 6),
            "smallest_gap_mm": round(float(gaps.min()), 6), "largest_gap_mm": round(float(gaps.max()), 6),
            "largest_shift_mm": round(float(np.abs(moved).max()), 6)}
