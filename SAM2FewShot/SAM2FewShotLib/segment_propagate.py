"""Propagate mode: the user's masks (and boxes, points) on some slices, propagated through the volume."""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import InputError
from .feature_cache import ProgressFn
from .propagation import Prompt, PropagationResult, propagate
from .report import build_report
from .session import VolumeSession
from .volume import LabelMap


def prompts_from_labels(session: VolumeSession, labels: LabelMap, values: Optional[Sequence[int]] = None) -> list[Prompt]:
    """One mask prompt per label value and slice where the label file has voxels of it."""
    session.volume.require_same_grid(labels.volume, "prompt labels")
    slices = session.slices_of(labels.volume.array)
    present = [int(v) for v in np.unique(slices) if v != 0]
    if not present:
        raise InputError("the prompt label file has no labelled voxel")
    chosen = present if values is None else [int(v) for v in values]
    for v in chosen:
        if v not in present:
            raise InputError(f"label value {v} does not exist in the prompt labels (values: {present})")
    prompts = []
    for v in chosen:
        hit = slices == v
        for t in np.flatnonzero(hit.any(axis=(1, 2))):
            prompts.append(Prompt(frame=int(t), obj_id=v, mask=hit[t]))
    return prompts


def segment_propagate(
    session: VolumeSession,
    prompts: Sequence[Prompt],
    segments,
    progress: Optional[ProgressFn] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
    frame_range: Optional[tuple[int, int]] = None,
) -> tuple[LabelMap, dict]:
    """The label map on the query's grid and the per-slice report."""
    wanted = {p.obj_id for p in prompts}
    segments = [s for s in segments if s.value in wanted]
    missing = wanted - {s.value for s in segments}
    if missing:
        raise InputError(f"prompts name label values with no segment: {sorted(missing)}")
    start = time.perf_counter()
    encoded_before = session.cache.encoded_frames
    result: PropagationResult = propagate(
        session.predictor, session.frames, prompts, cache=session.cache,
        progress=progress, should_cancel=should_cancel, frame_range=frame_range,
    )
    labels = session.to_labelmap(result.labels, segments)
    report = build_report("propagate", session, result, segments, time.perf_counter() - start,
                          session.cache.encoded_frames - encoded_before)
    return labels, report
