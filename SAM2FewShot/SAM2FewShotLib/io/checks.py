"""Degenerate volumes: refused in one line that names the file, or repaired by a rule the report states.

- Geometry: every spacing positive and finite, the direction orthonormal (within 1e-3): otherwise
  no voxel has a place in the world, and no result could be put back where it belongs. Refused.
- Nothing to segment: a volume with no finite voxel, or with one value everywhere (an all-zero
  export, a blank series), is refused rather than segmented into noise.
- NaN and infinite voxels among finite ones: the model input takes NaN and -Inf as the lowest
  finite value and +Inf as the highest. The file is never changed; the report counts them and a
  warning line says so.
"""

from __future__ import annotations

import logging

import numpy as np

from ..common.errors import InputError
from .volume import Volume

log = logging.getLogger(__name__)

ORTHONORMAL_TOLERANCE = 1e-3
CHUNK_VOXELS = 1 << 24  # voxels looked at per step: the checks never hold a mask of the whole volume


def check_geometry(volume: Volume, name: str) -> None:
    """InputError unless the spacing is positive and finite and the direction orthonormal."""
    spacing = np.asarray(volume.spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{name} has voxel spacing {tuple(spacing.tolist())}: every spacing must be a positive number")
    direction = volume.direction_matrix
    if not np.all(np.isfinite(direction)) or not np.allclose(direction.T @ direction, np.eye(3),
                                                             atol=ORTHONORMAL_TOLERANCE):
        raise InputError(f"{name} has a direction matrix that is not orthonormal ({np.round(direction, 3).tolist()}): "
                         "its voxel axes are not at right angles, so it has no well-defined geometry")
    if not np.all(np.isfinite(np.asarray(volume.origin, dtype=float))):
        raise InputError(f"{name} has an origin that is not a finite position: {volume.origin}")


def checked_image(volume: Volume, name: str) -> tuple[Volume, dict | None]:
    """The volume to segment or to learn from, repaired if it must be, and the note the report keeps.

    InputError when its geometry is degenerate or it holds nothing to segment.
    """
    check_geometry(volume, name)
    bad, low, high = _finite_range(volume.array)
    if low is None:
        raise InputError(f"{name} has no finite voxel (every value is NaN or infinite): there is nothing to segment")
    if low == high:
        raise InputError(f"{name} has the value {low:g} in every {'finite ' if bad else ''}voxel: there is "
                         "nothing to segment")
    if not bad:
        return volume, None
    array = volume.array.copy()
    np.nan_to_num(array, copy=False, nan=low, posinf=high, neginf=low)
    note = {"file": name, "non_finite_voxels": int(bad),
            "rule": "NaN and -Inf taken as the lowest finite value, +Inf as the highest (model input only)"}
    log.warning("%s: %d voxels are NaN or infinite; the model sees NaN and -Inf as %g and +Inf as %g "
                "(the file is not changed)", name, bad, low, high)
    return volume.with_array(array), note


def _finite_range(array: np.ndarray) -> tuple[int, float | None, float | None]:
    """(non-finite voxels, lowest finite value, highest finite value), a few slices at a time."""
    if not array.size:
        return 0, None, None
    if array.dtype.kind != "f":
        return 0, float(array.min()), float(array.max())
    flat = array.reshape(len(array), -1) if array.ndim > 1 else array.reshape(1, -1)
    step = max(1, CHUNK_VOXELS // max(1, flat.shape[1]))
    bad, low, high = 0, np.inf, -np.inf
    for start in range(0, len(flat), step):
        block = flat[start:start + step]
        finite = np.isfinite(block)
        bad += int(block.size - np.count_nonzero(finite))
        if finite.any():
            low, high = min(low, float(block[finite].min())), max(high, float(block[finite].max()))
    return (bad, None, None) if low > high else (bad, low, high)
