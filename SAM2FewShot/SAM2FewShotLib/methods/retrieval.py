"""Retrieval from a labelled library: the library slices most like each query slice condition SAM2.

Every labelled slice of the library is embedded once (cached on disk, library/index.py); each
query slice retrieves its top-k slices per structure by cosine; the retrieved image+mask pairs
become SAM2 conditioning memories of that slice (support/memory.py, scheme video+memory), combined
with SAM2's temporal memory of the neighbouring query predictions, both ways through the volume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import torch

from ..common.choices import EXTENTS, LIBRARY_FEATURES, PASS_ORDERS, PLACEMENTS
from ..common.errors import Cancelled, InputError
from ..common.progress import ENCODE_SUPPORTS, ProgressFn
from ..io.normalization import Normalization
from ..io.slicing import anatomical_plane, slicing_axis
from ..io.volume import LabelMap
from ..library.cases import Library
from ..library.index import IndexData, TopK
from ..library.sync import LibraryFeatures, library_features, sync_library
from ..sam2.feature_cache import FeatureCache, StackedCache
from ..sam2.frames import FrameSource, VolumeSlices
from ..sam2.propagation import propagate
from ..sam2.session import VolumeSession
from ..support.matching import Matches, relative_positions
from ..support.memory import SupportEntries, SupportMemoryPolicy
from ..support.slices import SupportSlice, stack_support
from .common import MethodInputs, build_report, keep_confident_extent


@dataclass(frozen=True)
class RetrievalParams:
    features: str = "sam2"  # or dinov2-small | dinov2-base | dinov2-large
    top_k: int = 3
    window: Optional[float] = None  # keep retrievals within this relative-position difference first
    neighbours: int = 1  # a slice is also conditioned by its neighbours' retrievals (up to top_k memories)
    extent: str = "largest-run"
    min_object_score: float = 0.0  # a structure is erased from slices where SAM2's object score is not above this
    normalization: Normalization = field(default_factory=Normalization)  # how library images become [0, 1]
    placement: str = "behind"  # where the memories sit in the video: behind | before-query | after-query
    passes: str = "both"  # both | forward | middle-out (support/memory.py, sam2/propagation.py)

    FROM_REQUEST = ("normalization",)  # the request's own: library images are normalised like the query

    def check(self) -> None:
        if self.features not in LIBRARY_FEATURES:
            raise InputError(f"unknown library features '{self.features}': use one of {', '.join(LIBRARY_FEATURES)}")
        if self.top_k < 1:
            raise InputError(f"top-k must be at least 1, got {self.top_k}")
        if self.window is not None and not self.window >= 0:
            raise InputError(f"the position window must be 0 or more, got {self.window}")
        if self.extent not in EXTENTS:
            raise InputError(f"unknown extent rule '{self.extent}': use {' or '.join(EXTENTS)}")
        if self.placement not in PLACEMENTS:
            raise InputError(f"unknown placement '{self.placement}': use one of {', '.join(PLACEMENTS)}")
        if self.passes not in PASS_ORDERS:
            raise InputError(f"unknown pass order '{self.passes}': use one of {', '.join(PASS_ORDERS)}")


def query_embeddings(session: VolumeSession, features: LibraryFeatures,
                     progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """sam2: the session's cached encoder embeddings (propagation reuses the encoding); else the extractor's."""
    if features.name == "sam2":
        return session.cache.embed_all(progress=progress)
    return features.extractor.embed(session.frames.slices01)


def retrieve(session: VolumeSession, data: IndexData, query: torch.Tensor, params: RetrievalParams,
             frame_range: Optional[tuple[int, int]] = None) -> dict[int, TopK]:
    """Top-k library rows per structure for every query slice.

    Positions for the window: without a slice range, a slice's place in its volume (both sides);
    with one, the query range maps to 0..1 and is compared with the place within the structure.
    """
    positions = relative_positions(session.num_slices, *(frame_range or (None, None)))
    field_name = "extent_position" if frame_range else "position"
    hits = data.search(query, params.top_k, None, positions, params.window, field_name)
    if frame_range is not None:  # slices nobody visits borrow a visited one's rows: nothing extra to load
        lo, hi = max(0, frame_range[0] - params.neighbours), min(session.num_slices - 1, frame_range[1] + params.neighbours)
        clamp = np.clip(np.arange(session.num_slices), lo, hi)
        hits = {v: TopK(h.rows[clamp], h.similarity[clamp], h.in_window[clamp]) for v, h in hits.items()}
    return hits


def conditioning_entries(library: Library, data: IndexData, hits: dict[int, TopK], session: VolumeSession,
                         plane: str, normalization: Normalization) -> tuple[SupportEntries, Matches]:
    """The retrieved slices as support entries (only those slices of only those cases are read)."""
    needed = np.unique(np.concatenate([h.rows.ravel() for h in hits.values()]))
    entry_of = {int(r): e for e, r in enumerate(needed)}
    by_case: dict[int, list[int]] = {}
    for r in needed:
        by_case.setdefault(int(data.case_of_row[r]), []).append(int(r))
    picked: dict[int, SupportSlice] = {}
    for case_no, rows in by_case.items():
        image, labels = library.case(data.case_ids[case_no]).load()
        axis = slicing_axis(image, plane)
        image01 = VolumeSlices(image.array, axis, normalization)  # only the retrieved slices are normalised
        lab = np.moveaxis(labels.volume.array, axis, 0)
        for r in rows:
            row = data.rows[r]
            s, v = int(row["slice"]), int(row["value"])
            picked[r] = SupportSlice(case_no, v, data.segments[v].name, s, float(row["extent_position"]),
                                     image01[s].numpy(), lab[s] == v)
    ordered = [picked[int(r)] for r in needed]
    images, masks = stack_support(ordered, (session.frames.height, session.frames.width))
    meta = [{"library_case": data.case_ids[p.case], "library_slice": p.index, "relative_position": round(p.position, 4)}
            for p in ordered]
    entries = SupportEntries(images, masks, np.array([p.value for p in ordered]), meta)
    to_entry = np.vectorize(lambda r: entry_of[int(r)], otypes=[np.int64])
    matches = Matches({v: to_entry(h.rows) for v, h in hits.items()},
                      {v: h.similarity for v, h in hits.items()},
                      {v: np.where(h.in_window, h.similarity, h.similarity - 4.0) for v, h in hits.items()})
    return entries, matches


def segment_retrieval(
    session: VolumeSession,
    library: Library,
    params: RetrievalParams = RetrievalParams(),
    features: Optional[LibraryFeatures] = None,
    progress: Optional[ProgressFn] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
    frame_range: Optional[tuple[int, int]] = None,
) -> tuple[LabelMap, dict]:
    """Every structure of the library segmented in the query; the report names what each slice retrieved."""
    params.check()
    start = time.perf_counter()
    predictor = session.predictor
    features = features or library_features(params.features, predictor, predictor.device)
    progress = _cancellable(progress, should_cancel)
    plane = anatomical_plane(session.volume, session.axis)
    encoded_before = session.cache.encoded_frames
    index, data, stats = sync_library(library, features, plane, params.normalization, progress)
    hits = retrieve(session, data, query_embeddings(session, features, progress), params, frame_range)
    entries, matches = conditioning_entries(library, data, hits, session, plane, params.normalization)
    support_cache = FeatureCache(predictor, FrameSource(entries.images01, predictor.image_size), predictor.device,
                                 batch_size=session.cache.batch_size, stage=ENCODE_SUPPORTS)
    policy = SupportMemoryPolicy(entries, matches, session.num_slices, "video+memory", params.neighbours,
                                 max_memories=params.top_k, placement=params.placement, passes=params.passes,
                                 frame_range=frame_range)
    result = propagate(predictor, session.frames, [], cache=StackedCache([session.cache, support_cache]),
                       policy=policy, progress=progress, should_cancel=should_cancel, frame_range=frame_range)
    segments = [data.segments[v] for v in sorted(hits)]
    keep_confident_extent(result, segments, params.extent, params.min_object_score)
    labels = session.to_labelmap(result.labels, segments)
    report = build_report("retrieval", session, result, segments, time.perf_counter() - start,
                          session.cache.encoded_frames + support_cache.encoded_frames - encoded_before)
    _add_retrievals(report, data, hits)
    report["retrieval"] = {
        "library": str(library.list_file or library.root), "cases": len(library), "features": features.key,
        "plane": plane, "top_k": params.top_k, "window": params.window, "neighbours": params.neighbours,
        "extent": params.extent, "min_object_score": params.min_object_score, "placement": params.placement, "passes": params.passes,
        "support_entries": len(entries),
        "index": {"folder": str(index.folder), "embeddings": len(data), "rows": int(len(data.rows)),
                  **stats.as_dict()},
    }
    return labels, report


def _add_retrievals(report: dict, data: IndexData, hits: dict[int, TopK]) -> None:
    """Per query slice and structure: every retrieved case, slice and cosine, best first."""
    for entry in report["slices"]:
        t = entry["slice"]
        for v, h in hits.items():
            obj = entry["objects"].setdefault(data.segments[v].name, {"value": v})
            obj["retrieved"] = [
                {"case": data.case_ids[int(data.case_of_row[r])], "slice": int(data.rows[r]["slice"]),
                 "similarity": round(float(s), 4), "in_window": bool(w)}
                for r, s, w in zip(h.rows[t], h.similarity[t], h.in_window[t])]


def _cancellable(progress: Optional[ProgressFn], should_cancel: Optional[Callable[[], bool]]) -> ProgressFn:
    def report(stage: str, done: int, total: int) -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled by the user")
        if progress is not None:
            progress(stage, done, total)

    return report


Params = RetrievalParams


def run(inputs: MethodInputs, params: RetrievalParams) -> tuple[LabelMap, dict]:
    """The library's index brought up to date with the request's features (SAM2's: the loaded model)."""
    predictor = inputs.session.predictor
    features = library_features(params.features, predictor, predictor.device, offline=inputs.model.offline,
                                random_weights=inputs.model.random_weights, seed=inputs.model.seed,
                                progress=inputs.progress or False)
    return segment_retrieval(inputs.session, inputs.library, replace(params, normalization=inputs.normalization),
                             features, progress=inputs.progress, should_cancel=inputs.should_cancel,
                             frame_range=inputs.frame_range)
