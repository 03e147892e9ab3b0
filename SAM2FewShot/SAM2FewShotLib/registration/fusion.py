"""Multi-atlas label fusion: several warped label maps on the query's grid become one.

Majority vote, per-structure STAPLE, or a vote weighted by each support's image similarity to the
query. The weighted vote is the default: on the MSD hippocampus cases it discards badly registered
supports, which an unweighted vote cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from ..common.choices import FUSION_METHODS
from ..common.errors import InputError
from ..io.volume import LabelMap, Segment

# Similarity (correlation) is raised to this power for the weighted vote. Hippocampus leave-one-out
# (benchmarks/registration_loo.py): powers 1 and 2 fuse alike, 4 and up let the best-scoring
# support outvote the others alone, which is no longer a fusion.
WEIGHT_POWER = 2.0


def fuse_labels(warped: Sequence[LabelMap], method: str = "majority",
                weights: Sequence[float] | None = None) -> LabelMap:
    """One label map from several on the same grid.

    Ties are broken the same way every time: a structure beats background, a lower label value
    beats a higher one. STAPLE runs per structure; a voxel takes the structure with the highest
    probability when that is above 0.5.
    """
    if method not in FUSION_METHODS:
        raise InputError(f"unknown fusion method '{method}': use {', '.join(FUSION_METHODS)}")
    if not warped:
        raise InputError("label fusion needs at least one label map")
    for other in warped[1:]:
        warped[0].volume.require_same_grid(other.volume, "fused label maps")
    values = sorted({v for lm in warped for v in lm.values} | _present_values(warped))
    arrays = [lm.volume.array for lm in warped]
    if method == "staple":
        fused = _staple(arrays, values)
    else:
        fused = _vote(arrays, values, _weights(method, weights, len(warped)))
    return LabelMap(warped[0].volume.with_array(fused.astype(warped[0].volume.array.dtype)),
                    _segments_of(warped, values))


def similarity_weights(similarities: Sequence[float], power: float = WEIGHT_POWER) -> list[float]:
    """Vote weights from correlations: negative ones count for nothing, good ones count more."""
    weights = [max(0.0, float(s)) ** power for s in similarities]
    return weights if sum(weights) > 0 else [1.0] * len(weights)


def _present_values(warped: Sequence[LabelMap]) -> set[int]:
    return {int(v) for lm in warped for v in np.unique(lm.volume.array) if v > 0}


def _segments_of(warped: Sequence[LabelMap], values: Sequence[int]) -> tuple[Segment, ...]:
    """Each value's segment from the first map that names it."""
    named: dict[int, Segment] = {}
    for lm in warped:
        for s in lm.segments:
            named.setdefault(s.value, s)
    return tuple(named[v] for v in values if v in named)


def _weights(method: str, weights: Sequence[float] | None, n: int) -> np.ndarray:
    if method == "majority":
        return np.ones(n)
    if weights is None or len(weights) != n:
        raise InputError(f"weighted fusion needs one weight per label map ({n}), got "
                         f"{'none' if weights is None else len(weights)}")
    w = np.asarray(weights, dtype=float)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InputError(f"fusion weights must be finite, non-negative and not all zero, got {list(weights)}")
    return w


def _vote(arrays: Sequence[np.ndarray], values: Sequence[int], weights: np.ndarray) -> np.ndarray:
    """Weighted vote; candidates go structures first (ascending), background last: earlier wins ties."""
    fused = np.zeros(arrays[0].shape, dtype=np.int64)
    best = np.full(arrays[0].shape, -1.0)
    for v in list(values) + [0]:
        score = np.zeros(arrays[0].shape)
        for array, w in zip(arrays, weights, strict=True):
            score += w * (array == v)
        better = score > best
        fused[better] = v
        best = np.where(better, score, best)
    return fused


def _staple(arrays: Sequence[np.ndarray], values: Sequence[int]) -> np.ndarray:
    """Per-structure STAPLE probabilities; a voxel takes the most probable structure above 0.5."""
    fused = np.zeros(arrays[0].shape, dtype=np.int64)
    best = np.full(arrays[0].shape, 0.5)
    for v in values:
        raters = [sitk.GetImageFromArray((a == v).astype(np.uint8)) for a in arrays]
        probability = sitk.GetArrayFromImage(sitk.STAPLE(raters, 1.0))
        better = probability > best
        fused[better] = v
        best = np.where(better, probability, best)
    # STAPLE's estimates degenerate when a structure fills the grid: unanimous votes stand as cast
    unanimous = np.all(np.stack(arrays) == arrays[0], axis=0)
    fused[unanimous] = arrays[0][unanimous]
    return fused
