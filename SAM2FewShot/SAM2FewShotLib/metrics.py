"""Overlap metrics between a result and a reference on the same grid."""

from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """3D Dice of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


def dice_per_label(result: np.ndarray, reference: np.ndarray, values) -> dict[int, float]:
    return {int(v): dice(result == v, reference == v) for v in values}
