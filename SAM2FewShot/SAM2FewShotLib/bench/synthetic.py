"""Synthetic labelled volumes of any slice count, for the speed and memory benchmarks.

Bright tubes run along the slicing axis (k, the thickest spacing), each wandering and changing
radius smoothly, so every structure is on every slice: one prompted slice reaches all of them.
Built slice by slice so that an 800-slice volume costs no more than its own voxels.
"""

from __future__ import annotations

import numpy as np

from ..io.volume import DEFAULT_COLORS, LabelMap, Segment, Volume

SYNTHETIC_SPACING = (0.8, 0.8, 2.0)  # (i, j, k) mm: k is the acquisition axis


def synthetic_case(
    n_slices: int,
    size: int = 256,
    n_structures: int = 3,
    seed: int = 0,
) -> tuple[Volume, LabelMap]:
    """An MR-like (n_slices, size, size) float32 volume with ``n_structures`` labelled tubes."""
    rng = np.random.default_rng(seed)
    jj, ii = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    image = np.empty((n_slices, size, size), np.float32)
    labels = np.zeros((n_slices, size, size), np.uint8)
    phase = rng.uniform(0, 2 * np.pi, size=(n_structures, 3))
    for k in range(n_slices):
        image[k] = 100.0 + 10.0 * rng.standard_normal((size, size), dtype=np.float32)
        for s in range(n_structures):
            angle = 2 * np.pi * (s + 0.5) / n_structures
            wobble = 0.04 * size * np.sin(k / 17.0 + phase[s, :2])
            cj = size * (0.5 + 0.25 * np.sin(angle)) + wobble[0]
            ci = size * (0.5 + 0.25 * np.cos(angle)) + wobble[1]
            radius = size * (0.09 + 0.03 * np.sin(k / 23.0 + phase[s, 2]))
            inside = (jj - cj) ** 2 + (ii - ci) ** 2 <= radius**2
            labels[k][inside & (labels[k] == 0)] = s + 1
            image[k][inside] += 300.0 + 80.0 * s
    segments = tuple(Segment(s + 1, f"tube_{s + 1}", DEFAULT_COLORS[s % len(DEFAULT_COLORS)])
                     for s in range(n_structures))
    geometry = dict(spacing=SYNTHETIC_SPACING, origin=(0.0, 0.0, 0.0))
    return Volume(image, **geometry), LabelMap(Volume(labels, **geometry), segments)


def slice_masks(labels: LabelMap, index: int) -> dict[int, np.ndarray]:
    """Each structure's mask on slice ``index`` along k (the synthetic volumes' slicing axis)."""
    plane = labels.volume.array[index]
    return {s.value: plane == s.value for s in labels.segments if (plane == s.value).any()}
