"""Matched support: segment every structure of labelled support cases in a query, with no clicks.

Support slices are augmented, embedded (SAM2's own encoder features, reused for propagation, or
plain intensity), matched to every query slice, and their image+mask pairs condition SAM2 as
memories (support/memory.py). The query's own labels are never read here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..common.choices import EXTENTS, PASS_ORDERS, PLACEMENTS, SCHEMES, SUPPORT_SELECTIONS
from ..common.choices import SIMILARITY_FEATURES as FEATURES
from ..common.errors import InputError
from ..common.progress import ProgressFn
from ..io.reorient import query_frame_shape, support_in_query_frame
from ..io.volume import LabelMap, Segment, SupportCase, Volume, support_name
from ..sam2.feature_cache import FeatureCache, StackedCache
from ..sam2.frames import FrameSource, VolumeSlices
from ..sam2.propagation import propagate
from ..sam2.session import VolumeSession
from ..support.matching import Matches
from ..support.memory import SupportEntries, SupportMemoryPolicy
from .common import MethodInputs, build_report, keep_confident_extent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FewShotParams:
    scheme: str = "video+memory"
    augmentations: int = 4  # augmented copies per support slice (the original is one of them)
    slices_per_structure: int = 8
    features: str = "sam2"  # or "intensity"
    top_k: int = 3
    neighbours: int = 1
    position_weight: float = 0.0
    extent: str = "largest-run"  # or "score": keep every slice SAM2's object score accepts
    min_object_score: float = 0.0  # a structure is erased from slices where SAM2's object score is not above this
    seed: int = 0
    selection: str = "matched"  # or "middle": every slice gets each structure's middle support slice
    placement: str = "behind"  # video+memory: where the memories sit (behind | before-query | after-query)
    passes: str = "both"  # video+memory: both | forward | middle-out (sam2/propagation.py)

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown scheme '{self.scheme}': use one of {', '.join(SCHEMES)}")
        if self.features not in FEATURES:
            raise InputError(f"unknown features '{self.features}': use {' or '.join(FEATURES)}")
        if self.extent not in EXTENTS:
            raise InputError(f"unknown extent rule '{self.extent}': use {' or '.join(EXTENTS)}")
        if self.augmentations < 1 or self.slices_per_structure < 1 or self.top_k < 1:
            raise InputError("augmentations, slices per structure and top-k must be at least 1")
        for name, value, allowed in (("selection", self.selection, SUPPORT_SELECTIONS),
                                     ("placement", self.placement, PLACEMENTS), ("passes", self.passes, PASS_ORDERS)):
            if value not in allowed:
                raise InputError(f"unknown {name} '{value}': use one of {', '.join(allowed)}")
        if self.scheme != "video+memory" and (self.placement, self.passes) != ("behind", "both"):
            raise InputError(f"placement and passes apply to the video+memory scheme, not to {self.scheme}")


def merged_segments(supports: Sequence[SupportCase], files: Sequence[Sequence[str]] = ()) -> tuple[Segment, ...]:
    """The structures of all supports, by name; values and colours from the first that has each.

    A structure a support lists but labels no voxel of is left out (another support may label it);
    one that no support labels is not segmented, and a warning says so. ``files``: the supports'
    (image, labels) files, named in errors."""
    by_name: dict[str, Segment] = {}
    listed: dict[str, str] = {}  # structure -> the first support that lists it without a voxel
    for n, (image, labels) in enumerate(supports):
        name = support_name(n, files)
        if image.array.ndim != 3:
            raise InputError(f"{name} is not a 3D volume")
        image.require_same_grid(labels.volume, f"{name} labels")
        present = set(np.unique(labels.volume.array).tolist()) - {0}
        if not present:
            raise InputError(f"{name} has no labelled voxel")
        for seg in labels.segments:
            if seg.value not in present:
                listed.setdefault(seg.name, name)
                continue
            known = by_name.get(seg.name)
            if known is None:
                if any(s.value == seg.value for s in by_name.values()):
                    raise InputError(f"{name}: structure '{seg.name}' uses label value {seg.value}, "
                                     "which another support gives to a different structure")
                by_name[seg.name] = seg
            elif known.value != seg.value:
                raise InputError(f"structure name '{seg.name}' has value {known.value} in one support and "
                                 f"{seg.value} in {name}")
    for structure, name in listed.items():
        if structure not in by_name:
            log.warning("%s lists the structure '%s' but no support labels a voxel of it: it is not segmented",
                        name, structure)
    return tuple(sorted(by_name.values(), key=lambda s: s.value))


def support_entries(supports: Sequence[SupportCase], session: VolumeSession, segments, params: FewShotParams,
                    device: torch.device) -> SupportEntries:
    """Representative support slices per structure, augmented, cut like the query's slices: each support
    is brought into the query's orientation and in-plane spacing first (io/reorient.py).

    They are stacked at the supports' own largest slice size, not the query's: the model sees every
    frame at its image size anyway, and entries that do not depend on the query (supports already in
    the query's frame, or queries of one geometry) are encoded once for a whole cohort (support_store.py).
    ``support_slice`` counts slices of the grid a slice was cut from (the support's own unless
    ``support_reoriented``); ``support_offset_mm`` places it along the query's slice normal.
    """
    from ..support.augment import augment_slices
    from ..support.slices import select_support_slices, stack_support

    query, axis = session.volume, session.axis
    size = support_slice_size(supports, query, axis)
    normal = query.direction_matrix[:, 2 - axis]
    wanted = {seg.value for seg in segments}
    images, masks, structure, meta = [], [], [], []
    for case, support in enumerate(supports):
        image, labels = support_in_query_frame(*support, query, axis)  # the same objects when aligned
        image01 = VolumeSlices(image.array, axis, session.normalization)  # percentiles: each support its own
        present = sorted(wanted & set(np.unique(labels.volume.array).tolist()))
        if not present:
            continue
        picked = select_support_slices(image01, labels, axis, params.slices_per_structure, case, present,
                                       rule="middle" if params.selection == "middle" else "spread")
        imgs, msks = stack_support(picked, size)
        aug = augment_slices(imgs, msks, params.augmentations, seed=params.seed + case, device=device)
        for m in range(aug.images.shape[0]):
            src = picked[int(aug.source[m])]
            structure.append(src.value)
            meta.append({"support_case": case, "support_slice": src.index,
                         "support_offset_mm": _offset_mm(image, axis, src.index, normal),
                         "support_reoriented": image is not support[0],
                         "relative_position": round(src.position, 4), "augmentation": aug.params[m].as_dict()})
        images.append(aug.images.cpu())
        masks.append(aug.masks.cpu())
    if not images:
        raise InputError("the supports have no slice with the chosen structures")
    return SupportEntries(torch.cat(images), torch.cat(masks), np.asarray(structure), meta)


def support_slice_size(supports: Sequence[SupportCase], query: Volume, axis: int) -> tuple[int, int]:
    """(H, W): the largest slice of any support cut like the query's (from the headers: nothing resampled)."""
    shapes = [np.delete(query_frame_shape(image, query, axis), axis) for image, _ in supports]
    return int(max(s[0] for s in shapes)), int(max(s[1] for s in shapes))


def _offset_mm(image: Volume, axis: int, index: int, normal: np.ndarray) -> float:
    """Where a support slice lies along the query's slice normal (LPS mm): comparable however the
    support is stored, where ``support_slice`` counts slices of the grid it was cut from."""
    ijk = np.zeros(4)
    ijk[2 - axis], ijk[3] = index, 1.0
    return round(float(normal @ (image.ijk_to_lps() @ ijk)[:3]), 3)


def match_entries(session: VolumeSession, entries: SupportEntries, support_cache: FeatureCache,
                  params: FewShotParams, progress: Optional[ProgressFn],
                  frame_range: Optional[tuple[int, int]] = None) -> Matches:
    """Top-k support entries of each structure for every query slice."""
    from ..support.features import IntensityFeatures
    from ..support.matching import match_slices, relative_positions

    if params.features == "sam2":  # the encoder features propagation needs anyway
        q, s = session.cache.embed_all(progress=progress), support_cache.embed_all(progress=progress)
    else:
        extractor = IntensityFeatures()
        q, s = extractor.embed(session.frames.slices01), extractor.embed(entries.images01)
    positions = relative_positions(session.num_slices, *(frame_range or (None, None)))
    return match_slices(q, s, positions, np.array([m["relative_position"] for m in entries.meta]),
                        params.position_weight, entries.structure, params.top_k)


def fixed_matches(entries: SupportEntries, num_query: int, top_k: int) -> Matches:
    """Every query slice gets the same entries per structure (the first ``top_k``, in support order):
    FS-MedSAM2's fixed support, with no similarity involved."""
    picks, nan = {}, {}
    for value in np.unique(entries.structure):
        rows = np.flatnonzero(entries.structure == value)[:top_k]
        picks[int(value)] = np.tile(rows, (num_query, 1))
        nan[int(value)] = np.full(picks[int(value)].shape, np.nan, dtype=np.float32)
    return Matches(picks, nan, nan)


def segment_fewshot(
    session: VolumeSession,
    supports: Sequence[SupportCase],
    params: FewShotParams = FewShotParams(),
    progress: Optional[ProgressFn] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
    frame_range: Optional[tuple[int, int]] = None,
    files: Sequence[Sequence[str]] = (),
) -> tuple[LabelMap, dict]:
    """Every structure of the supports, segmented in the query; the report says what conditioned each slice.
    ``files``: the supports' (image, labels) files, named in errors."""
    params.check()
    if not supports:
        raise InputError("no support case was given")
    start = time.perf_counter()
    encoded_before = session.cache.encoded_frames
    segments = merged_segments(supports, files)
    predictor = session.predictor
    entries = support_entries(supports, session, segments, params, predictor.device)
    key = hashlib.sha1(entries.images01.numpy().tobytes() + entries.masks.numpy().tobytes()).hexdigest()
    support_cache = session.support_cache(key, FrameSource(entries.images01, predictor.image_size))
    support_encoded_before = support_cache.encoded_frames
    if params.selection == "middle":
        matches = fixed_matches(entries, session.num_slices, params.top_k)
    else:
        matches = match_entries(session, entries, support_cache, params, progress, frame_range)
    policy = SupportMemoryPolicy(entries, matches, session.num_slices, params.scheme, params.neighbours,
                                 max_memories=params.top_k, placement=params.placement, passes=params.passes,
                                 frame_range=frame_range)
    result = propagate(predictor, session.frames, [], cache=StackedCache([session.cache, support_cache]),
                       policy=policy, progress=progress, should_cancel=should_cancel, frame_range=frame_range)
    keep_confident_extent(result, segments, params.extent, params.min_object_score)
    labels = session.to_labelmap(result.labels, segments)
    report = build_report("matched-support", session, result, segments, time.perf_counter() - start,
                          session.cache.encoded_frames - encoded_before
                          + support_cache.encoded_frames - support_encoded_before)
    report["fewshot"] = {"scheme": params.scheme, "augmentations": params.augmentations,
                         "slices_per_structure": params.slices_per_structure, "features": params.features,
                         "top_k": params.top_k, "extent": params.extent, "min_object_score": params.min_object_score, "selection": params.selection,
                         "placement": params.placement, "passes": params.passes, "support_entries": len(entries),
                         "supports": len(supports)}
    return labels, report


Params = FewShotParams


def run(inputs: MethodInputs, params: FewShotParams) -> tuple[LabelMap, dict]:
    return segment_fewshot(inputs.session, inputs.supports, params, progress=inputs.progress,
                           should_cancel=inputs.should_cancel, frame_range=inputs.frame_range,
                           files=inputs.support_files)
