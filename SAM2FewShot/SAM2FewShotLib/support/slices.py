"""Support slices: the labelled 2D slices of a support case that few-shot matching chooses from.

Each slice keeps where it sits within its structure's extent along the slicing axis, so matching
can prefer supports from the same part of the organ (its first slices look nothing like its middle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..common.errors import InputError
from ..io.volume import LabelMap, default_segments
from ..sam2.frames import VolumeSlices, resize


@dataclass(frozen=True)
class SupportSlice:
    """One slice of a support case with one structure's mask on it."""

    case: int
    value: int
    name: str
    index: int  # slice index along the slicing axis
    position: float  # 0 at the first slice with the structure, 1 at the last (0.5 if only one)
    image: np.ndarray  # (H, W) float32 in [0, 1]
    mask: np.ndarray  # (H, W) bool

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def select_support_slices(
    image01: np.ndarray | VolumeSlices,
    labels: LabelMap,
    axis: int,
    per_structure: int | None = 5,
    case: int = 0,
    structures: Sequence[int] | None = None,
    rule: str = "spread",
) -> list[SupportSlice]:
    """Per structure, ``per_structure`` slices spread evenly over its extent, the largest always in;
    or, with ``rule="middle"``, the one slice halfway through the slices that contain it (the
    support slice FS-MedSAM2 gives its video: ``zlist[int(0.5 * len(zlist))]``).

    ``per_structure=None`` keeps every slice that contains the structure. ``structures`` (label
    values) defaults to the label map's segments that have voxels (or every label value present
    when it names no segments); a structure asked for by value must be present.
    """
    lab = labels.volume.array
    if axis not in (0, 1, 2):
        raise InputError(f"slicing axis must be 0, 1 or 2, got {axis}")
    laid_out = (lab.shape[axis],) + tuple(n for a, n in enumerate(lab.shape) if a != axis)  # VolumeSlices' order
    lazy = isinstance(image01, VolumeSlices)  # normalised when a slice is taken: no float copy of the support
    if image01.ndim != 3 or (tuple(image01.shape) != laid_out if lazy else image01.shape != lab.shape):
        raise InputError(
            f"support image {tuple(image01.shape)} and labels {lab.shape} must be 3D arrays of the same shape"
        )
    if per_structure is not None and per_structure < 1:
        raise InputError(f"slices per structure must be at least 1, got {per_structure}")
    if not np.any(lab > 0):
        raise InputError(f"support case {case} has no labelled voxel")
    segments = labels.segments or default_segments(np.unique(lab[lab > 0]))
    names = {s.value: s.name for s in segments}
    other_axes = tuple(a for a in range(3) if a != axis)
    if structures is None:
        values = [s.value for s in segments if np.any(lab == s.value)]
        if not values:
            raise InputError(f"support case {case} has none of its segments' label values {list(names)}")
    else:
        values = [int(v) for v in structures]
    out: list[SupportSlice] = []
    for value in values:
        areas = np.count_nonzero(lab == value, axis=other_axes)
        present = np.flatnonzero(areas)
        if present.size == 0:
            raise InputError(f"structure {names.get(value, value)} (label {value}) is absent from support case {case}")
        first, last = int(present[0]), int(present[-1])
        picks = [int(present[len(present) // 2])] if rule == "middle" else spread_indices(
            present, areas[present], per_structure)
        for idx in picks:
            pos = 0.5 if last == first else (idx - first) / (last - first)
            out.append(
                SupportSlice(
                    case=case,
                    value=int(value),
                    name=names.get(value, f"label_{value}"),
                    index=int(idx),
                    position=float(pos),
                    image=image01[idx].numpy() if lazy else np.ascontiguousarray(np.take(image01, idx, axis=axis),
                                                                                  dtype=np.float32),
                    mask=np.take(lab, idx, axis=axis) == value,
                )
            )
    return out


def spread_indices(present: np.ndarray, areas: np.ndarray, count: int | None) -> list[int]:
    """``count`` of the ``present`` slice indices spread evenly, the one with the largest area included.

    Evenly means over the list of slices that contain the structure, so gaps do not waste picks.
    """
    if count is None or count >= len(present):
        return [int(i) for i in present]
    largest = int(np.argmax(areas))
    picks = np.unique(np.round(np.linspace(0, len(present) - 1, count)).astype(int))
    if largest not in picks:  # it replaces the nearest pick, the two ends kept when there is a middle
        first = 1 if len(picks) > 2 else 0
        middle = picks[first : len(picks) - first]
        picks[first + int(np.argmin(np.abs(middle - largest)))] = largest
    return [int(present[p]) for p in sorted(picks)]


def stack_support(slices: Sequence[SupportSlice], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) images in [0, 1] and bool masks at one size, for slices of cases of different shapes.

    Masks are resized by nearest neighbour so a slice's mask stays exactly binary.
    """
    if not slices:
        raise InputError("no support slices to stack")
    images, masks = [], []
    for s in slices:
        img = torch.from_numpy(s.image)[None].float()
        msk = torch.from_numpy(s.mask)[None, None].float()
        images.append(resize(img, size))
        masks.append(F.interpolate(msk, size=size, mode="nearest-exact")[0] > 0.5)
    return torch.cat(images).clamp_(0.0, 1.0), torch.cat(masks)
