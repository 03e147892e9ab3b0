"""Registration prior: carry a labelled support case onto the query grid with SimpleITK.

Rigid, then affine, then optionally a B-spline, each multi-resolution, on percentile-normalised
images with normalised correlation. The affine and B-spline stages only look at the query region
where the support's structures land (their dilated labels, warped by the previous stage): on the
MSD hippocampus crops, fitting the whole field of view aligns the surroundings, not the structure.
Thin stacks (a cardiac cine short-axis series: 6-12 slices of 8-10 mm) register too: the pyramid
shrinks and smooths per axis (pyramid.py); the B-spline gets no more control points along an axis
than it has voxels, and is skipped where the structures span too few slices to hold one.
Constraining the affine's through-plane terms, or a 2D in-plane affine per slice, measured no
better on 8 mm hippocampus stacks, so the 3D transforms stay unconstrained.
Imports no torch: this is the CPU-only, weight-free path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..common.choices import TRANSFORMS
from ..common.errors import InputError
from ..common.progress import ProgressFn
from ..io.normalization import Normalization
from ..io.volume import LabelMap, Volume
from .pyramid import execute_levels, plan, too_small

# Fixed thread count: ITK splits sums per work unit, so the count must not follow the host.
THREADS = 2
PERCENTILES = (1.0, 99.0)  # the MSD hippocampus cases differ in scale by orders of magnitude
MASK_MARGIN_MM = 4.0  # how far around the support's structures the affine and B-spline stages look
MAX_SAMPLES = 60_000  # full sampling below this many voxels (hippocampus), random above (CT)
SHRINK = (2, 1)  # per level; pyramid.plan keeps a thin stack's slice axis out of it
SIGMAS_VOXELS = (1.0, 0.0)
BSPLINE_SPACING_MM = 12.0  # control-point spacing over the masked region
BSPLINE_ORDER = 3
# Along any axis of the region, at least two voxels per control point of one span, or no B-spline:
# on 8 mm hippocampus stacks (3-6 slices in the region) it drifted 20+ mm and lost Dice to the affine.
BSPLINE_MIN_VOXELS = 2 * (BSPLINE_ORDER + 1)
BSPLINE_ITERATIONS = 15
BSPLINE_MAX_SAMPLES = 3_000
BSPLINE_SHRINK = (2, 1)


@dataclass(frozen=True)
class RegisteredSupport:
    """One support carried onto the query grid.

    similarity: normalised cross-correlation between the query and the warped support over the
    region the support's structures cover (dilated), in [-1, 1]; the fusion weight.
    """

    labels: LabelMap
    image: Volume
    transform: sitk.Transform
    similarity: float
    seconds: float


def register_support(
    query: Volume,
    support_image: Volume,
    support_labels: LabelMap,
    transform: str = "affine",
    progress: ProgressFn | None = None,
    seed: int = 0,
) -> RegisteredSupport:
    """Register the support image to the query and warp its labels (nearest neighbour)."""
    if transform not in TRANSFORMS:
        raise InputError(f"unknown registration transform '{transform}': use {' or '.join(TRANSFORMS)}")
    support_image.require_same_grid(support_labels.volume, "support labels")
    if not np.any(support_labels.volume.array > 0):
        raise InputError("the support label map has no labelled voxel")
    for name, volume in (("query", query), ("support", support_image)):
        need = too_small(volume.shape_ijk)
        if need:
            raise InputError(f"the {name} volume {volume.shape_ijk} is too small to register: it needs {need}")
    start = time.perf_counter()
    with _itk_threads(THREADS):
        result, fixed, moving, labels, region = _fit(query, support_image, support_labels, transform, progress, seed)
        warped_labels = sitk.GetArrayFromImage(_warp(labels, fixed, result))
        warped_image = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, result, sitk.sitkLinear, 0.0))
        in_region = sitk.GetArrayFromImage(_warp(region, fixed, result)) > 0
    return RegisteredSupport(
        labels=LabelMap(query.with_array(warped_labels.astype(support_labels.volume.array.dtype)),
                        support_labels.segments),
        image=query.with_array(warped_image),
        transform=result,
        similarity=normalised_correlation(sitk.GetArrayFromImage(fixed), warped_image, in_region),
        seconds=time.perf_counter() - start,
    )


def _fit(query: Volume, support_image: Volume, support_labels: LabelMap, transform: str,
         progress: ProgressFn | None, seed: int):
    """The transform from query to support points, and the images it was fitted on."""
    fixed, moving = _normalised(query), _normalised(support_image)
    labels = _label_image(support_labels)
    region = _dilated(labels > 0, MASK_MARGIN_MM)
    stages = 3 if transform == "affine_bspline" else 2
    sampling = (min(1.0, MAX_SAMPLES / float(np.prod(fixed.GetSize()))), seed + 1)  # ITK seed 0 = wall clock
    rigid = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY)
    _optimise(fixed, moving, rigid, sampling)
    _report(progress, 1, stages)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    _optimise(fixed, moving, affine, sampling, fixed_mask=_nonempty(_warp(region, fixed, affine)))
    _report(progress, 2, stages)
    result: sitk.Transform = affine
    if transform == "affine_bspline":
        result = _bspline(fixed, moving, affine, _warp(region, fixed, affine), sampling)
        _report(progress, 3, stages)
    return result, fixed, moving, labels, region


@contextmanager
def _itk_threads(n: int) -> Iterator[None]:
    """ITK's pyramid and metric filters follow the global default, so pin it while registering."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def normalised_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two images over a mask; 0 when either is flat there."""
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    if x.size < 2:
        return 0.0
    x -= x.mean()
    y -= y.mean()
    den = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return float(np.dot(x, y) / den) if den > 0 else 0.0


def _normalised(volume: Volume) -> sitk.Image:
    scaled = Normalization("percentile", percentiles=PERCENTILES).apply(volume.array)
    return volume.with_array(scaled).to_sitk()


def _label_image(labels: LabelMap) -> sitk.Image:
    return labels.volume.with_array(labels.volume.array.astype(np.uint16)).to_sitk()


def _dilated(mask: sitk.Image, margin_mm: float) -> sitk.Image:
    radius = [max(1, int(round(margin_mm / s))) for s in mask.GetSpacing()]
    return sitk.BinaryDilate(sitk.Cast(mask, sitk.sitkUInt8), radius)


def _warp(labels: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    return sitk.Resample(labels, reference, transform, sitk.sitkNearestNeighbor, 0)


def _nonempty(mask: sitk.Image) -> sitk.Image | None:
    """The mask, or None when the support's structures landed outside the query (fit everything)."""
    return mask if np.any(sitk.GetArrayViewFromImage(mask)) else None


def _method(sampling: tuple[float, int], fixed_mask: sitk.Image | None) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    percentage, seed = sampling
    if percentage < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(percentage, seed)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _run(make: Callable[[], sitk.ImageRegistrationMethod], fixed: sitk.Image, moving: sitk.Image,
         shrink: tuple[int, ...] = SHRINK) -> None:
    """Multi-resolution: ITK's own pyramid when every axis of both images can follow it, else per axis."""
    sigmas = tuple(SIGMAS_VOXELS[SHRINK.index(f)] for f in shrink)
    fixed_levels, moving_levels = plan(fixed, shrink, sigmas), plan(moving, shrink, sigmas)
    if not (fixed_levels.uniform and fixed_levels == moving_levels):
        execute_levels(make, fixed, moving, fixed_levels, moving_levels, _execute)
        return
    reg = make()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    _execute(reg, fixed, moving)


def _optimise(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, sampling: tuple[float, int],
              fixed_mask: sitk.Image | None = None) -> None:
    """Fit ``transform`` in place (rigid or affine)."""
    def make() -> sitk.ImageRegistrationMethod:
        reg = _method(sampling, fixed_mask)
        reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200, relaxationFactor=0.5)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetInitialTransform(transform, inPlace=True)
        return reg
    _run(make, fixed, moving)


def _bspline(fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, fixed_mask: sitk.Image,
             sampling: tuple[float, int]) -> sitk.Transform:
    """A B-spline over the masked region's bounding box, on top of the affine."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(fixed_mask)
    if not stats.HasLabel(1):  # the structures landed outside the query: nothing to refine
        return affine
    box = stats.GetBoundingBox(1)
    if min(box[3:]) < BSPLINE_MIN_VOXELS:  # a thin stack's few slices cannot hold a cubic B-spline
        return affine
    region = sitk.RegionOfInterest(fixed, box[3:], box[:3])
    extent = [n * s for n, s in zip(box[3:], fixed.GetSpacing(), strict=True)]
    # no more control points (mesh + order) along an axis than it has voxels: a thin stack's slices
    mesh = [max(1, min(int(round(e / BSPLINE_SPACING_MM)), n - BSPLINE_ORDER))
            for e, n in zip(extent, box[3:], strict=True)]
    bspline = sitk.BSplineTransformInitializer(region, mesh, order=BSPLINE_ORDER)
    n_mask = int(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask)))
    def make() -> sitk.ImageRegistrationMethod:
        reg = _method((min(1.0, BSPLINE_MAX_SAMPLES / max(1, n_mask)), sampling[1]), fixed_mask)
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=BSPLINE_ITERATIONS,
                                 maximumNumberOfCorrections=5,
                                 maximumNumberOfFunctionEvaluations=4 * BSPLINE_ITERATIONS,
                                 costFunctionConvergenceFactor=1e7)
        reg.SetMovingInitialTransform(affine)
        reg.SetInitialTransform(bspline, inPlace=True)
        return reg
    _run(make, fixed, moving, BSPLINE_SHRINK)
    return sitk.CompositeTransform([affine, bspline])


def _execute(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image) -> None:
    """ITK's failures (no overlap left between the images) as one line the user can act on."""
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"registration of the support to the query failed ({detail}): do the two images "
                         "show the same anatomy, with overlapping fields of view?") from None


def _report(progress: ProgressFn | None, done: int, total: int) -> None:
    if progress is not None:
        progress("register", done, total)
