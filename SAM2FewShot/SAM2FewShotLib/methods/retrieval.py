"""Retrieval from a labelled library: the library slices most like each query slice condition SAM2.

Every labelled slice of the library is embedded once (cached on disk, library/index.py); each
query slice retrieves its top-k slices per structure by cosine (library/retrieval.py); the retrieved
image+mask pairs become SAM2 conditioning memories of that slice (methods/memory_conditioned.py, scheme
video+memory), combined with SAM2's temporal memory of the neighbouring query predictions, both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..common.choices import LIBRARY_FEATURES
from ..common.context import RunContext
from ..common.errors import InputError
from ..common.progress import ENCODE_SUPPORTS
from ..io.normalization import Normalization
from ..io.volume import LabelMap
from .common import MethodInputs
from .options import MEMORY_OPTIONS, MemoryParams, Option

if TYPE_CHECKING:
    from ..library.cases import Library
    from ..library.sync import LibraryFeatures
    from ..sam2.session import VolumeSession


@dataclass(frozen=True)
class RetrievalParams(MemoryParams):
    features: str = "sam2"  # or dinov2-small | dinov2-base | dinov2-large
    window: float | None = None  # keep retrievals within this relative-position difference first
    normalization: Normalization = field(default_factory=Normalization)  # how library images become [0, 1]

    FROM_REQUEST = ("normalization",)  # the request's own: library images are normalised like the query

    def check(self) -> None:
        if self.features not in LIBRARY_FEATURES:
            raise InputError(f"unknown library features '{self.features}': use one of {', '.join(LIBRARY_FEATURES)}")
        if self.window is not None and not self.window >= 0:
            raise InputError(f"the position window must be 0 or more, got {self.window}")
        super().check()


Params = RetrievalParams
OPTIONS = (Option("--library-features", "retrieval descriptors", LIBRARY_FEATURES).at("features"),
           Option("--position-window", "prefer library slices whose relative position differs by at most W (0..1)",
                  metavar="W").at("window"),
           *MEMORY_OPTIONS)


def segment_retrieval(session: VolumeSession, library: Library, params: RetrievalParams = RetrievalParams(),
                      features: LibraryFeatures | None = None,
                      context: RunContext = RunContext()) -> tuple[LabelMap, dict]:
    """Every structure of the library segmented in the query; the report names what each slice retrieved."""
    from ..io.slicing import anatomical_plane
    from ..library.retrieval import add_retrievals, conditioning_entries, query_embeddings, retrieve
    from ..library.sync import library_features, sync_library
    from ..sam2.feature_cache import FeatureCache
    from ..sam2.frames import FrameSource
    from .memory_conditioned import Conditioning, Tally, memory_report, segment_with_memories

    params.check()
    tally = Tally(session)
    predictor = session.predictor
    features = features or library_features(params.features, predictor, predictor.device)
    progress = context.cancellable_progress()  # embedding a library is long: a cancel stops it
    plane = anatomical_plane(session.volume, session.axis)
    index, data, stats = sync_library(library, features, plane, params.normalization, progress)
    hits = retrieve(session, data, query_embeddings(session, features, progress), params.top_k, params.window,
                    params.neighbours, context.frame_range)
    entries, matches = conditioning_entries(library, data, hits, session, plane, params.normalization)
    cache = tally.watch(FeatureCache(predictor, FrameSource(entries.images01, predictor.image_size), predictor.device,
                                     batch_size=session.cache.batch_size, stage=ENCODE_SUPPORTS))
    segments = [data.segments[v] for v in sorted(hits)]
    labels, report = segment_with_memories("retrieval", session, Conditioning(entries, matches, cache, segments),
                                           params, context, tally)
    add_retrievals(report, data, hits)
    report["retrieval"] = {
        "library": str(library.list_file or library.root), "cases": len(library), "features": features.key,
        "plane": plane, "window": params.window, **memory_report(params, len(entries)),
        "index": {"folder": str(index.folder), "embeddings": len(data), "rows": int(len(data.rows)),
                  **stats.as_dict()},
    }
    return labels, report


def run(inputs: MethodInputs, params: RetrievalParams) -> tuple[LabelMap, dict]:
    """The library's index brought up to date with the request's features (SAM2's: the loaded model)."""
    from ..library.sync import library_features

    predictor = inputs.session.predictor
    features = library_features(params.features, predictor, predictor.device, offline=inputs.model.offline,
                                random_weights=inputs.model.random_weights, seed=inputs.model.seed,
                                progress=inputs.context.progress or False)
    return segment_retrieval(inputs.session, inputs.library, replace(params, normalization=inputs.normalization),
                             features, inputs.context)
