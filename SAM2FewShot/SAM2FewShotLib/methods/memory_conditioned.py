"""The one pipeline of the methods conditioned by support memories (matched support, retrieval).

Each method says which support entries (image + mask) condition which query slice: matched support
from its augmented supports (support/entries.py), retrieval from its library (library/retrieval.py).
From there the path is the same: the entries' encoder features beside the query's, the memory policy,
the propagation both ways, the structures kept where SAM2 is confident, the label map and the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..common.context import RunContext
from ..io.volume import LabelMap, Segment
from ..sam2.feature_cache import FeatureCache, StackedCache
from ..sam2.propagation import propagate
from ..sam2.session import VolumeSession
from ..support.matching import Matches
from ..support.memory import SupportEntries, SupportMemoryPolicy
from .common import build_report, keep_confident_extent
from .options import MemoryParams


@dataclass
class Conditioning:
    """What a memory-conditioned method hands the pipeline: the entries, each slice's matches among them,
    the entries' feature cache, and the structures to segment."""

    entries: SupportEntries
    matches: Matches
    cache: FeatureCache
    segments: Sequence[Segment]
    scheme: str = "video+memory"  # how the memories condition the query (support/memory.py)


class Tally:
    """Time and encoder passes of a run from its start, whatever caches it used (features reused from an
    earlier run are not counted)."""

    def __init__(self, session: VolumeSession):
        self.session, self.start = session, time.perf_counter()
        self.before = session.cache.encoded_frames
        self.caches: list[tuple[FeatureCache, int]] = []

    def watch(self, cache: FeatureCache) -> FeatureCache:
        """Count ``cache``'s encoder passes from now on."""
        self.caches.append((cache, cache.encoded_frames))
        return cache

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def encoded(self) -> int:
        return self.session.cache.encoded_frames - self.before + sum(c.encoded_frames - n for c, n in self.caches)


def segment_with_memories(method: str, session: VolumeSession, conditioning: Conditioning, params: MemoryParams,
                          context: RunContext, tally: Tally) -> tuple[LabelMap, dict]:
    """Propagate the query conditioned by the entries' memories; the label map and the per-slice report."""
    policy = SupportMemoryPolicy(conditioning.entries, conditioning.matches, session.num_slices, conditioning.scheme,
                                 params.neighbours, max_memories=params.top_k, placement=params.placement,
                                 passes=params.passes, frame_range=context.frame_range)
    result = propagate(session.predictor, session.frames, [], cache=StackedCache([session.cache, conditioning.cache]),
                       policy=policy, context=context)
    keep_confident_extent(result, conditioning.segments, params.extent, params.min_object_score)
    labels = session.to_labelmap(result.labels, conditioning.segments)
    report = build_report(method, session, result, conditioning.segments, tally.seconds, tally.encoded)
    return labels, report


def memory_report(params: MemoryParams, entries: int) -> dict:
    """The report's account of the shared parameters."""
    return {"top_k": params.top_k, "neighbours": params.neighbours, "extent": params.extent,
            "min_object_score": params.min_object_score, "placement": params.placement, "passes": params.passes,
            "support_entries": entries}
