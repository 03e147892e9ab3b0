"""Scalar volume nodes <-> Volume, with exact geometry (MRML's IJKToRAS <-> our LPS).

Only Slicer's MRML and VTK classes are used (never Qt, never slicer.util helpers that need the
application), so the same code runs inside 3D Slicer and headless with the ``slicer-core`` wheel.
The MRML classes come from the ``slicer`` module in both; it is imported lazily so that the rest
of the engine never needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..common.errors import InputError
from ..io.volume import Volume

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

def volume_from_node(node, harden: bool = False) -> Volume:
    """A scalar volume node's voxels (copied, display windowing ignored) with world geometry.

    A node under a parent transform raises InputError unless ``harden`` is True; then a linear
    transform is folded into the geometry (voxels untouched) and a non-linear one is applied to a
    copy outside the scene by Slicer's own hardening (resampled), leaving node and scene unchanged.
    """
    _require_scalar_volume(node)
    parent = node.GetParentTransformNode()
    if parent is not None and not harden:
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
    return volume_from_ijk_to_ras(array_from_image(image), ijk_to_ras)


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
    """Slicer's hardening of a non-linear transform, applied to a copy outside the scene."""
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkCommonTransforms import vtkGeneralTransform

    copy = mrml().vtkMRMLScalarVolumeNode()
    image = vtkImageData()
    image.DeepCopy(node.GetImageData())
    copy.SetAndObserveImageData(image)
    copy.SetIJKToRASMatrix(numpy_to_matrix(node_ijk_to_ras(node)))
    to_world = vtkGeneralTransform()
    node.GetParentTransformNode().GetTransformToWorld(to_world)
    copy.ApplyTransform(to_world)
    return copy.GetImageData(), node_ijk_to_ras(copy)
