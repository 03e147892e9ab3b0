"""The registration method: the support cases registered to the query and their labels fused.

CPU only and weight-free: no SAM2 model is ever loaded. Each support is registered (rigid, affine,
optionally B-spline), its labels warped onto the query's grid and the warped maps fused.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..common.choices import FUSION_METHODS, TRANSFORMS
from ..common.context import RunContext
from ..common.errors import InputError
from ..common.progress import FUSE_LABELS, ProgressFn, register_stage
from ..io.slicing import slicing_axis
from ..io.volume import LabelMap, Segment, SupportCase, Volume, voxel_counts
from .common import MethodInputs
from .options import FUSION, TRANSFORM


@dataclass(frozen=True)
class Params:
    transform: str = "affine"  # affine or affine_bspline
    fusion: str = "weighted"  # several supports: majority, staple or weighted

    def check(self) -> None:
        if self.transform not in TRANSFORMS:
            raise InputError(f"unknown registration transform '{self.transform}': use {' or '.join(TRANSFORMS)}")
        if self.fusion not in FUSION_METHODS:
            raise InputError(f"unknown fusion method '{self.fusion}': use {', '.join(FUSION_METHODS)}")


OPTIONS = (TRANSFORM.at(), FUSION.at())


def run(inputs: MethodInputs, params: Params) -> tuple[LabelMap, dict]:
    labels, report = registration_segment(inputs.query, inputs.supports, params.transform, params.fusion,
                                          inputs.context)
    slices = inputs.query.array.shape[slicing_axis(inputs.query, inputs.axis)]
    report["timing"]["per_slice_s"] = round(report["timing"]["total_s"] / max(1, slices), 4)
    return labels, report


def registration_segment(query: Volume, supports: Sequence[SupportCase], transform: str = "affine",
                         fusion: str = "weighted", context: RunContext = RunContext()) -> tuple[LabelMap, dict]:
    """The CPU-only strategy: register every support, warp its labels, fuse; no SAM2, no weights."""
    from ..registration.fusion import fuse_labels, similarity_weights
    from ..registration.register import register_support

    if fusion not in FUSION_METHODS:
        raise InputError(f"unknown fusion method '{fusion}': use {', '.join(FUSION_METHODS)}")
    supports = _checked_supports(SupportCase.listed(supports))
    start = time.perf_counter()
    n = len(supports)
    warped, similarities, entries = [], [], []
    for index, (image, labels) in enumerate(supports):
        context.check_cancelled()
        reg = register_support(query, image, labels, transform,
                               progress=_support_progress(context.progress, index, n))
        warped.append(reg.labels)
        similarities.append(reg.similarity)
        entries.append({"support": index, "similarity": round(reg.similarity, 4),
                        "time_s": round(reg.seconds, 3)})
    context.report(FUSE_LABELS, 0, 1)
    fusion_start = time.perf_counter()
    weights = similarity_weights(similarities) if fusion == "weighted" else None
    method = fusion if n > 1 else "none"
    result = fuse_labels(warped, fusion, weights) if n > 1 else warped[0]
    if weights is not None:
        total = sum(weights)
        for entry, w in zip(entries, weights, strict=True):
            entry["weight"] = round(w / total, 4)
    context.report(FUSE_LABELS, 1, 1)
    report = {
        "method": "registration",
        "transform": transform,
        "fusion": method,
        "supports": entries,
        "segments": [{"value": s.value, "name": s.name, "color": list(s.color), "terminology": s.terminology}
                     for s in result.segments],
        "timing": {"total_s": round(time.perf_counter() - start, 3),
                   "fusion_s": round(time.perf_counter() - fusion_start, 3)},
        "structures": _structures(result, max(similarities)),
    }
    return result, report


def _structures(labels: LabelMap, similarity: float) -> list[dict]:
    """Per structure: found (voxels written) or not. Registration carries every structure over, so it
    cannot tell one absent from the query: the best similarity is the support's, not the structure's."""
    counts = voxel_counts(labels.volume.array, max((s.value for s in labels.segments), default=0))
    return [{"value": s.value, "name": s.name, "status": "found" if counts[s.value] else "not found",
             "voxels": int(counts[s.value]), "best_similarity": round(similarity, 4)} for s in labels.segments]


def _support_progress(progress: ProgressFn | None, index: int, n: int) -> ProgressFn | None:
    """One support's registration steps, as the stage of that support ('register support 2/4')."""
    if progress is None:
        return None

    def report(stage: str, done: int, total: int) -> None:
        progress(register_stage(index, n), done, total)

    return report


def _checked_supports(supports: Sequence[SupportCase]) -> list[tuple[Volume, LabelMap]]:
    """All supports valid before any work starts, labels renumbered to the first support's values.

    Fusion votes structure by structure, so every support must label the same ones: a support
    without one of them would vote it away wherever the others agree on it."""
    if not supports:
        raise InputError("the registration strategy needs at least one support case")
    reference = supports[0].labels.segments
    names = {s.name for s in reference}
    checked = []
    for support in supports:
        image, labels, name = support.image, support.labels, support.name
        image.require_same_grid(labels.volume, f"{name} labels")
        if not np.any(labels.volume.array > 0):
            raise InputError(f"{name} has no labelled voxel")
        other = {s.name for s in labels.segments}
        if other != names:
            lacks, adds = sorted(names - other), sorted(other - names)
            raise InputError(
                f"{name} labels other structures than {supports[0].name}"
                + (f": it lacks {', '.join(lacks)}" if lacks else "")
                + (f"{';' if lacks else ':'} it adds {', '.join(adds)}" if adds else "")
                + " (registration fuses the supports structure by structure: give supports that label the same "
                  "structures, or use matched-support)")
        checked.append((image, _renumbered(labels, reference)))
    return checked


def _renumbered(labels: LabelMap, reference: Sequence[Segment]) -> LabelMap:
    """The same structures under the reference's values, names, colours and terminology."""
    by_name = {s.name: s for s in reference}
    if all(by_name[s.name].value == s.value for s in labels.segments):
        return LabelMap(labels.volume, tuple(reference))
    source = labels.volume.array
    out = np.zeros_like(source)
    for s in labels.segments:
        out[source == s.value] = by_name[s.name].value
    return LabelMap(labels.volume.with_array(out), tuple(reference))
