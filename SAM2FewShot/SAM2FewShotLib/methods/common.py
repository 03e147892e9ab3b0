"""What every method shares: the inputs the Runner hands it, the per-slice JSON report, the extent rule.

The report says, per slice and structure, where its mask came from, SAM2's object score and the
time; the extent rule keeps a structure on its longest run of slices (where it starts and ends in
the query is not known in advance).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..common.context import RunContext
from ..io.normalization import Normalization
from ..io.volume import LabelMap, SupportCase, Volume, voxel_counts
from ..sam2.build import ModelOptions
from ..sam2.conditioning import Prompt

if TYPE_CHECKING:  # annotations only: a method module loads without torch (the CLI's help, the panel)
    from ..library.cases import Library
    from ..sam2.propagation import PropagationResult
    from ..sam2.session import VolumeSession

log = logging.getLogger(__name__)


@dataclass
class MethodInputs:
    """What a method runs on: the request's files read, its model loaded and its query prepared."""

    query: Volume
    session: VolumeSession | None = None  # frames and features of the query; None without a model
    supports: Sequence[SupportCase] = ()
    library: Library | None = None
    prompt_labels: LabelMap | None = None  # masks on some slices, on the query's grid
    values: Sequence[int] | None = None  # the labels of prompt_labels to use (default all)
    prompts: Sequence[Prompt] = ()  # boxes and points from the request's prompts file
    axis: str = "auto"
    normalization: Normalization = field(default_factory=Normalization)  # as the request gave it
    model: ModelOptions = field(default_factory=ModelOptions)
    context: RunContext = field(default_factory=RunContext)  # progress, cancel, slice range


def build_report(method: str, session: VolumeSession, result: PropagationResult, segments, seconds: float,
                 frames_encoded: int) -> dict:
    by_value = {s.value: s for s in segments}
    visited = int(np.count_nonzero(result.visited.any(axis=1))) or len(result.labels)  # a slice range runs fewer
    slices = []
    for t in range(len(result.labels)):
        objects = {}
        for o, obj_id in enumerate(result.obj_ids):
            score = float(result.object_scores[t, o])
            entry = {
                "value": obj_id,
                "source": result.sources[t].get(obj_id, "not visited"),
                "object_score": None if math.isnan(score) else round(score, 4),
                "voxels": int(np.count_nonzero(result.labels[t] == obj_id)),
            }
            entry.update(result.details[t].get(obj_id, {}) if result.details else {})
            objects[by_value[obj_id].name if obj_id in by_value else str(obj_id)] = entry
        slices.append({"slice": t, "time_s": round(float(result.seconds[t]), 4),
                       "visited": {"forward": bool(result.visited[t, 0]), "backward": bool(result.visited[t, 1])},
                       "objects": objects})
    return {
        "method": method,
        "session": session.describe(),
        "segments": [{"value": s.value, "name": s.name, "color": list(s.color), "terminology": s.terminology}
                     for s in segments],
        "timing": {"total_s": round(seconds, 3), "frames_encoded": frames_encoded, "slices_run": visited,
                   "per_slice_s": round(seconds / max(1, visited), 4)},
        "slices": slices,
        "structures": structures_found(result, segments),
    }


def structures_found(result: PropagationResult, segments) -> list[dict]:
    """Per structure: found or not in the written labels, and SAM2's best object score (on which slice).

    A structure absent from the query (a support's tumour, a removed organ) gets no voxel where
    SAM2's object score says no object; the report says "not found" rather than leaving it unsaid.
    """
    names = {s.value: s.name for s in segments}
    top = max(result.obj_ids, default=0)
    counts = np.array([voxel_counts(section, top) for section in result.labels])
    out = []
    for o, obj_id in enumerate(result.obj_ids):
        scores = result.object_scores[:, o]
        seen = np.isfinite(scores)
        voxels = int(counts[:, obj_id].sum()) if len(counts) else 0
        best = int(np.nanargmax(np.where(seen, scores, -np.inf))) if seen.any() else None
        out.append({"value": obj_id, "name": names.get(obj_id, str(obj_id)),
                    "status": "found" if voxels else "not found", "voxels": voxels,
                    "slices": int(np.count_nonzero(counts[:, obj_id])) if len(counts) else 0,
                    "best_object_score": None if best is None else round(float(scores[best]), 4),
                    "best_slice": best})
        if not voxels:
            log.warning("%s: not found in the query (best object score %s)", out[-1]["name"],
                        "none" if best is None else f"{scores[best]:.2f} on slice {best}")
    return out


def keep_confident_extent(result: PropagationResult, segments, extent: str, min_score: float) -> None:
    """The few-shot methods' last step, in place: each structure erased where SAM2's object score is not
    above ``min_score`` (SAM2 itself blanks a mask at 0), then kept on its longest run of slices when
    ``extent`` is "largest-run"."""
    if min_score > 0.0:
        erase_below_score(result, min_score)
    if extent == "largest-run":
        for seg in segments:
            result.labels = largest_run(result.labels, seg.value)


def erase_below_score(result: PropagationResult, min_score: float) -> None:
    """Erase each structure from the slices where SAM2's object score is at or below ``min_score``
    (in place). SAM2 itself blanks a mask at a score of 0; a higher threshold keeps only the slices
    it is surer of, so an absent structure leaves no low-confidence islands."""
    for o, obj_id in enumerate(result.obj_ids):
        for t in np.flatnonzero(~(result.object_scores[:, o] > min_score)):  # NaN (not visited): nothing there
            section = result.labels[t]
            section[section == obj_id] = 0


def largest_run(slice_labels: np.ndarray, value: int) -> np.ndarray:
    """Keep a structure only on its longest run of consecutive non-empty slices (in place, slice by
    slice: no temporary the size of the volume)."""
    present = np.array([bool((s == value).any()) for s in slice_labels], dtype=bool)
    best, start, best_span = 0, None, (0, -1)
    for t, p in enumerate(np.append(present, False)):
        if p and start is None:
            start = t
        elif not p and start is not None:
            if t - start > best:
                best, best_span = t - start, (start, t - 1)
            start = None
    for t in np.flatnonzero(present):
        if not best_span[0] <= t <= best_span[1]:
            slice_labels[t][slice_labels[t] == value] = 0
    return slice_labels
