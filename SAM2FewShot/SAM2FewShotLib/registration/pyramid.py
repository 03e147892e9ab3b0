"""Per-axis multi-resolution for registration, so thin stacks (a cardiac cine short-axis series:
6-12 slices of 8-10 mm, 1.2-1.6 mm in plane) register as well as isotropic volumes.

SimpleITK's ImageRegistrationMethod shrinks and smooths every axis by the same factor per level,
and its metrics take image gradients with a recursive Gaussian of sigma = the largest spacing,
which needs 4 voxels along every axis and, on 9 mm slices, blurs the in-plane detail by 9 mm.
Here an axis is shrunk (and smoothed) only while it keeps 4 voxels and stays finer than the
coarsest axis, each level runs as its own one-level registration on images shrunk here, and the
metrics take central-difference gradients. Isotropic volumes keep ITK's own pyramid unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import SimpleITK as sitk

MIN_VOXELS = 4  # along an axis, at every level: the least a smoothed, shrunk axis keeps
MIN_SLICES = 2  # a stack thinner than this has no through-plane extent to register
MIN_IN_PLANE = 8  # voxels along each of the two larger axes


@dataclass(frozen=True)
class Pyramid:
    """Per level, per axis (i, j, k): the shrink factor and the smoothing sigma in voxels."""

    shrinks: tuple[tuple[int, ...], ...]
    sigmas: tuple[tuple[float, ...], ...]

    @property
    def uniform(self) -> bool:
        """Every axis shrinks alike at every level: ITK's own pyramid does exactly this."""
        return all(len(set(s)) == 1 for s in self.shrinks) and all(len(set(s)) == 1 for s in self.sigmas)


def too_small(size: tuple[int, ...]) -> str | None:
    """Why a volume of this (i, j, k) size cannot be registered at all, or None."""
    thin, *plane = sorted(size)
    if thin < MIN_SLICES or min(plane) < MIN_IN_PLANE:
        return f"at least {MIN_SLICES} slices and {MIN_IN_PLANE} voxels along the other two axes"
    return None


def plan(image: sitk.Image, factors: tuple[int, ...], sigmas: tuple[float, ...]) -> Pyramid:
    """The levels for ``image``: ``factors`` and ``sigmas`` (voxels) per level, each axis shrunk by
    its level's factor only while it keeps MIN_VOXELS and gets no coarser than the level's target
    (the finest spacing times the factor, or the coarsest spacing if larger): a 9 mm slice axis
    stays at full resolution while the 1.4 mm plane is shrunk."""
    size, spacing = image.GetSize(), image.GetSpacing()
    shrinks, smooth = [], []
    for factor, sigma in zip(factors, sigmas, strict=True):
        target = max(max(spacing), min(spacing) * factor) * (1 + 1e-6)
        axis_shrink = tuple(factor if n // factor >= MIN_VOXELS and s * factor <= target else 1
                            for n, s in zip(size, spacing, strict=True))
        shrinks.append(axis_shrink)
        smooth.append(tuple(sigma if f == factor else 0.0 for f in axis_shrink))
    return Pyramid(tuple(shrinks), tuple(smooth))


def level_image(image: sitk.Image, shrink: tuple[int, ...], sigma: tuple[float, ...]) -> sitk.Image:
    """Smoothed (per-axis sigma, voxels) then shrunk (per-axis factor), as ITK's pyramid does it."""
    if any(s > 0 for s in sigma):
        image = sitk.DiscreteGaussian(image, [s * s for s in sigma], 32, 0.01, False)
    return sitk.Shrink(image, list(shrink)) if any(f > 1 for f in shrink) else image


def execute_levels(make: Callable[[], sitk.ImageRegistrationMethod], fixed: sitk.Image, moving: sitk.Image,
                   fixed_levels: Pyramid, moving_levels: Pyramid,
                   execute: Callable[[sitk.ImageRegistrationMethod, sitk.Image, sitk.Image], None]) -> None:
    """Run one single-level registration per level, coarse to fine, on the transform ``make`` sets in place.

    Gradients by central differences: ITK's default recursive-Gaussian gradient needs 4 voxels
    per axis and smooths by the largest spacing, the slice thickness here.
    """
    for level in range(len(fixed_levels.shrinks)):
        reg = make()
        reg.SetShrinkFactorsPerLevel([1])
        reg.SetSmoothingSigmasPerLevel([0.0])
        reg.SetMetricUseFixedImageGradientFilter(False)
        reg.SetMetricUseMovingImageGradientFilter(False)
        execute(reg, level_image(fixed, fixed_levels.shrinks[level], fixed_levels.sigmas[level]),
                level_image(moving, moving_levels.shrinks[level], moving_levels.sigmas[level]))
