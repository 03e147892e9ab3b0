"""How a volume is cut into slices: the slicing axis, slice-first views, and the plane an axis shows.

Arrays are (k, j, i); axes are numpy axes of such an array. Pure numpy, so registration, the
library and the Slicer panel use it without torch.
"""

from __future__ import annotations

import numpy as np

from ..common.errors import InputError
from .volume import Volume

# Anatomical axis -> index of the LPS coordinate it runs along.
ANATOMICAL_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def slicing_axis(volume: Volume, choice: str = "auto") -> int:
    """The numpy axis (0 = k, 1 = j, 2 = i) to slice along.

    auto: the acquisition axis, i.e. the largest spacing (thick slices); an isotropic volume is
    sliced axially. axial/coronal/sagittal: the voxel axis best aligned with S, P or L.
    """
    return _axis(volume.spacing, volume.direction_matrix, choice)


def acquisition_plane(spacing, direction) -> str:
    """The plane ``slicing_axis(..., "auto")`` cuts a volume with this geometry in (headers suffice)."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    return _plane(direction, _axis(spacing, direction, "auto"))


def _axis(spacing, direction: np.ndarray, choice: str) -> int:
    choice = (choice or "auto").lower()
    if choice == "auto":
        sp = np.asarray(spacing)
        if sp.max() > sp.min() * 1.01:
            return 2 - int(np.argmax(sp))
        choice = "axial"
    if choice not in ANATOMICAL_AXES:
        raise InputError(f"unknown slicing axis '{choice}': use auto, axial, coronal or sagittal")
    column = int(np.argmax(np.abs(direction[ANATOMICAL_AXES[choice], :])))
    return 2 - column


def to_slices(array: np.ndarray, axis: int) -> np.ndarray:
    """(N, H, W) view with the slicing axis first."""
    return np.moveaxis(array, axis, 0)


def from_slices(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of to_slices: back to (k, j, i) order."""
    return np.ascontiguousarray(np.moveaxis(stack, 0, axis))


def anatomical_plane(volume: Volume, axis: int) -> str:
    """axial/coronal/sagittal: the anatomical direction the query's slicing axis runs along."""
    return _plane(volume.direction_matrix, axis)


def _plane(direction: np.ndarray, axis: int) -> str:
    column = direction[:, 2 - axis]
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(column)))]
