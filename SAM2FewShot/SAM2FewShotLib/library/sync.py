"""A support library's index kept in step: which features embed its slices, and embedding only what changed.

A library case is embedded once per (features, plane, normalisation): its labelled slices become
vectors in the on-disk index (index.py); the retrieval method and `sam2fewshot library build`
both bring the index up to date through ``sync_library``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..common.choices import LIBRARY_FEATURES
from ..common.errors import InputError
from ..common.progress import ProgressFn
from ..io.normalization import Normalization
from ..sam2.checkpoint import weights_fingerprint
from ..support.features import FeatureExtractor, make_extractor
from .cases import Library, LibraryCase, labelled_slices
from .index import CaseEmbeddings, EmbeddingIndex, IndexConfig, IndexData, SyncStats, segments_json

PLANES = ("axial", "coronal", "sagittal")


def acquisition_planes(library: Library) -> tuple[str, ...]:
    """Every plane some case of the library was acquired in (its images' headers tell): the planes
    queries of the same kinds are cut in by ``--axis auto``."""
    from ..io.slicing import acquisition_plane
    from ..io.volume_io import read_geometry

    found = {acquisition_plane(*read_geometry(case.image)) for case in library.cases}
    return tuple(p for p in PLANES if p in found)


@dataclass(frozen=True)
class LibraryFeatures:
    """A slice extractor and the identity of its vectors (what the index is keyed by)."""

    name: str
    key: str
    extractor: FeatureExtractor


def library_features(name: str, predictor=None, device: torch.device | str = "cpu", offline: bool = False,
                     random_weights: bool = False, seed: int = 0, model: torch.nn.Module | None = None,
                     progress=True) -> LibraryFeatures:
    """'sam2': pooled encoder features of ``predictor``; 'dinov2-*': DINOv2 (``model``, random or pretrained)."""
    if name == "sam2":
        if predictor is None:
            raise InputError("sam2 library features need the SAM2 model")
        key = f"sam2:{predictor.image_size}:{weights_fingerprint(predictor)}"
        return LibraryFeatures(name, key, make_extractor("sam2", predictor=predictor, device=device))
    from ..support.dinov2 import make_dinov2_features

    if name not in LIBRARY_FEATURES:
        raise InputError(f"unknown library features '{name}': use one of {', '.join(LIBRARY_FEATURES)}")
    extractor = make_dinov2_features(name, model=model, offline=offline, progress=progress, device=device,
                                     random_weights=random_weights, seed=seed)
    return LibraryFeatures(name, extractor.key, extractor)


def normalization_key(normalization: Normalization) -> dict:
    return {"mode": normalization.mode, "window": list(normalization.window) if normalization.window else None,
            "percentiles": list(normalization.percentiles), "per_slice": normalization.per_slice}


def open_index(library: Library, features: LibraryFeatures, plane: str = "axial",
               normalization: Normalization = Normalization()) -> EmbeddingIndex:
    if plane not in PLANES:
        raise InputError(f"unknown plane '{plane}': use {', '.join(PLANES)}")
    return EmbeddingIndex(library.index_root(), IndexConfig(features.key, plane, normalization_key(normalization)))


def case_embedder(features: LibraryFeatures, plane: str, normalization: Normalization
                  ) -> Callable[[LibraryCase], CaseEmbeddings]:
    """Embeds one library case: its labelled slices in ``plane``, normalised like a query."""
    def embed(case: LibraryCase) -> CaseEmbeddings:
        image, labels = case.load()
        found = labelled_slices(image, labels, plane, normalization)
        vectors = features.extractor.embed(torch.from_numpy(found.images01)).numpy()
        present = set(int(v) for v in found.rows["value"])
        segments = [s for s in labels.segments if s.value in present]
        return CaseEmbeddings(vectors, found.rows, segments_json(segments), found.num_slices)

    return embed


def sync_library(library: Library, features: LibraryFeatures, plane: str = "axial",
                 normalization: Normalization = Normalization(), progress: ProgressFn | None = None
                 ) -> tuple[EmbeddingIndex, IndexData, SyncStats]:
    """The library's index, brought up to date (only new or changed cases are embedded), loaded."""
    index = open_index(library, features, plane, normalization)
    data, stats = index.sync(library.cases, case_embedder(features, plane, normalization), progress)
    if len(data) == 0:
        raise InputError(f"the library {library.root} has no usable labelled case "
                         f"({'; '.join(f'{c}: {r}' for c, r in stats.skipped) or 'none found'})")
    return index, data, stats
