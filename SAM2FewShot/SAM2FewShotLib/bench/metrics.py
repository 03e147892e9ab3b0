"""Accuracy of a result against ground truth, per structure, in physical space (millimetres).

Surfaces are the voxels of a mask with a face neighbour outside it (voxels on the image border
count as surface). Distances run between voxel centres, with the volume's spacing, from SimpleITK's
exact Euclidean distance map (SignedMaurerDistanceMap, float32; scipy is not a dependency).

- 3D Dice: 2|A and B| / (|A| + |B|).
- HD95: the larger of the two directed 95th percentiles of surface-to-surface distances (the
  symmetric definition MONAI uses), in mm.
- Surface Dice (NSD) at tolerance t mm: the share of both surfaces' voxels that lie within t of the
  other surface, (|dA->B <= t| + |dB->A <= t|) / (|surfA| + |surfB|), counted per voxel.

Empty masks, by convention: both empty is perfect agreement (Dice 1, HD95 0, NSD 1); one empty and
the other not is total disagreement (Dice 0, HD95 = inf, NSD 0). Summaries leave inf out of the
HD95 mean and count it apart; NaN never comes out of a single comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..io.volume import LabelMap

DEFAULT_TOLERANCE_MM = 1.0
FLOAT32_SLACK_MM = 1e-4  # ITK's distance maps are float32: a distance equal to the tolerance counts as within


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """3D Dice of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


def dice_per_label(result: np.ndarray, reference: np.ndarray, values) -> dict[int, float]:
    return {int(v): dice(result == v, reference == v) for v in values}


@dataclass(frozen=True)
class StructureScores:
    dice: float
    hd95_mm: float  # inf when exactly one of the masks is empty
    nsd: float  # surface Dice at the tolerance
    tolerance_mm: float
    result_voxels: int
    truth_voxels: int

    @property
    def empty(self) -> str | None:
        """Which side is empty, if any: 'both', 'result' or 'truth'."""
        if self.result_voxels == 0 and self.truth_voxels == 0:
            return "both"
        if self.result_voxels == 0:
            return "result"
        return "truth" if self.truth_voxels == 0 else None

    def as_json(self) -> dict:
        """JSON has no inf: a non-finite HD95 is null, and 'empty' says which mask was empty."""
        out = asdict(self)
        out["hd95_mm"] = self.hd95_mm if math.isfinite(self.hd95_mm) else None
        out["empty"] = self.empty
        return out


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one of their 6 face neighbours outside it."""
    m = np.asarray(mask, bool)
    padded = np.pad(m, 1, constant_values=False)
    interior = m.copy()
    for axis in range(m.ndim):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in range(m.ndim))]
    return m & ~interior


def distance_to(mask: np.ndarray, spacing_ijk: Sequence[float]) -> np.ndarray:
    """Distance in mm from every voxel centre to the nearest voxel of ``mask`` (non-empty)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_ijk))
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    out = np.abs(sitk.GetArrayFromImage(dist)).astype(np.float64)
    out[np.asarray(mask, bool)] = 0.0  # on its own voxels ITK's float32 can leave a rounding residue
    return out


def surface_distances(a: np.ndarray, b: np.ndarray, spacing_ijk: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of a to b's surface, and from b's to a's (both non-empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    box = _bounding_box(a | b)  # exact: every surface voxel and its nearest partner lie inside
    sa, sb = surface_voxels(a[box]), surface_voxels(b[box])
    return distance_to(sb, spacing_ijk)[sa], distance_to(sa, spacing_ijk)[sb]


def hd95(a: np.ndarray, b: np.ndarray, spacing_ijk: Sequence[float], percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance in mm (0 when both empty, inf when one is)."""
    return _scores(a, b, spacing_ijk, DEFAULT_TOLERANCE_MM, percentile).hd95_mm


def surface_dice(a: np.ndarray, b: np.ndarray, spacing_ijk: Sequence[float],
                 tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (1 when both empty, 0 when one is)."""
    return _scores(a, b, spacing_ijk, tolerance_mm).nsd


def score_masks(result: np.ndarray, truth: np.ndarray, spacing_ijk: Sequence[float],
                tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> StructureScores:
    """Dice, HD95 and surface Dice of one structure, sharing one pair of distance maps."""
    return _scores(result, truth, spacing_ijk, tolerance_mm)


def _scores(a, b, spacing_ijk, tolerance_mm: float, percentile: float = 95.0) -> StructureScores:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    na, nb = int(a.sum()), int(b.sum())
    if na == 0 or nb == 0:
        both = na == nb
        return StructureScores(1.0 if both else 0.0, 0.0 if both else math.inf, 1.0 if both else 0.0,
                               float(tolerance_mm), na, nb)
    d_ab, d_ba = surface_distances(a, b, spacing_ijk)
    hd = max(float(np.percentile(d_ab, percentile)), float(np.percentile(d_ba, percentile)))
    limit = tolerance_mm + FLOAT32_SLACK_MM
    within = int((d_ab <= limit).sum() + (d_ba <= limit).sum())
    return StructureScores(dice(a, b), hd, within / (d_ab.size + d_ba.size), float(tolerance_mm), na, nb)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(x for x in range(mask.ndim) if x != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def score_labels(result: LabelMap, truth: LabelMap,
                 tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict[str, StructureScores]:
    """Scores per ground-truth structure (by name); the result's structure is found by name, else value."""
    truth.volume.require_same_grid(result.volume, "result")
    by_name = {s.name: s.value for s in result.segments}
    result_values = set(result.values)
    out = {}
    for seg in truth.segments:
        value = by_name.get(seg.name, seg.value if seg.value in result_values else None)
        mask = result.volume.array == value if value is not None else np.zeros(result.volume.array.shape, bool)
        out[seg.name] = score_masks(mask, truth.volume.array == seg.value, truth.volume.spacing, tolerance_mm)
    return out


@dataclass(frozen=True)
class Summary:
    mean: float | None
    sd: float | None
    n: int  # finite values the mean is over
    n_inf: int = 0  # left out of the mean: one mask was empty (HD95 only)

    def as_json(self) -> dict:
        return asdict(self)


def summarize(values: Iterable[float]) -> Summary:
    """Mean and sample standard deviation of the finite values; infinities counted apart."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    finite = [v for v in vals if math.isfinite(v)]
    n_inf = len(vals) - len(finite)
    if not finite:
        return Summary(None, None, 0, n_inf)
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return Summary(float(np.mean(finite)), sd, len(finite), n_inf)
