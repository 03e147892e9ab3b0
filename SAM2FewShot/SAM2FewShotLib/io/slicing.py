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


def prompt_plane(query: Volume, prompt_labels: np.ndarray, choose: str = "with --axis") -> str:
    """The plane the prompt masks were drawn in ("auto" when they are solid in 3D): propagation
    runs across the slices the user drew on, whatever the voxel spacing says. ``choose`` tells
    the user where to choose a plane, in their front end's words."""
    try:
        axis = drawn_axis(prompt_labels)
    except PromptPlanesError as exc:
        planes = " and ".join(anatomical_plane(query, a) for a in exc.axes)
        raise InputError(f"the prompt masks are drawn on slices of more than one plane ({planes}): "
                         f"draw them in one plane, or choose the plane {choose}") from None
    if axis is None:
        return "auto"
    plane = plane_of_axis(query, axis)
    if plane is None:
        raise InputError(f"the prompt masks lie on oblique slices; choose the plane to slice along {choose}")
    return plane


def plane_of_axis(volume: Volume, axis: int) -> str | None:
    """The plane name that ``slicing_axis`` maps back to this voxel axis; None on an oblique volume,
    where no plane name picks it."""
    plane = anatomical_plane(volume, axis)
    return plane if slicing_axis(volume, plane) == axis else None


class PromptPlanesError(InputError):
    """Prompt masks drawn in more than one plane: the caller asks the user which to slice along."""

    def __init__(self, axes: tuple[int, ...], message: str):
        super().__init__(message)
        self.axes = axes


def drawn_axis(labels: np.ndarray) -> int | None:
    """The numpy axis perpendicular to the slices the user drew prompt masks on, or None.

    A voxel painted in a slice view is part of a layer one or a few slices thick along the view's
    axis and wider in the view's plane; each voxel votes for the axis of its shortest run of
    same-label voxels when that run is clearly (2x) shorter than along the other axes. Drawn masks
    give most voxels such a vote; masks solid in 3D (fewer than half the voxels vote) give None,
    and the caller slices along the acquisition axis. PromptPlanesError when two axes each get
    the votes of a tenth of the voxels.
    """
    votes, voxels = np.zeros(3, dtype=np.int64), 0
    labels = labels[_box(labels > 0)]  # a few drawn slices of a large volume: the rest is never looked at
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        votes += _axis_votes(mask)
        voxels += int(np.count_nonzero(mask))
    share = votes / max(voxels, 1)
    drawn = tuple(int(a) for a in np.flatnonzero(share >= 0.1))
    if share[list(drawn)].sum() < 0.5:
        return None  # solid in 3D: no plane was drawn in
    if len(drawn) > 1:
        raise PromptPlanesError(drawn, "prompt masks are drawn on slices of more than one plane")
    return drawn[0]


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The slices of ``mask``'s bounding box along each axis (empty when nothing is set)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 0))
    return tuple(box)


def _axis_votes(mask: np.ndarray) -> np.ndarray:
    """Per axis, how many voxels of ``mask`` lie in a layer clearly thinnest along that axis."""
    crop = mask[_box(mask)]
    runs = np.stack([_run_lengths(crop, axis)[crop] for axis in range(3)])  # (3, voxels)
    order = np.sort(runs, axis=0)
    clear = 2 * order[0] <= order[1]
    return np.bincount(np.argmin(runs, axis=0)[clear], minlength=3)


def _run_lengths(mask: np.ndarray, axis: int) -> np.ndarray:
    """For each voxel of ``mask``, the length of the run of set voxels through it along ``axis``."""
    m = np.moveaxis(mask, axis, -1)

    def ending_here(a: np.ndarray) -> np.ndarray:
        counts = np.cumsum(a, axis=-1, dtype=np.int32)
        return counts - np.maximum.accumulate(np.where(a, 0, counts), axis=-1)

    forward = ending_here(m)
    backward = ending_here(m[..., ::-1])[..., ::-1]
    return np.moveaxis(np.where(m, forward + backward - 1, 0), -1, axis)
