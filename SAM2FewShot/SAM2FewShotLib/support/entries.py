"""The support entries of matched support: each support's labelled slices cut like the query's, picked per
structure, augmented, and matched to every query slice.

Supports are brought into the query's orientation and in-plane spacing first (io/reorient.py), so an
entry is what the query's slices look like; the entries and their matches then condition SAM2 through
the memory policy (support/memory.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..common.context import RunContext
from ..common.errors import InputError
from ..io.reorient import query_frame_shape, support_in_query_frame
from ..io.volume import Segment, SupportCase, Volume
from ..sam2.feature_cache import FeatureCache
from ..sam2.frames import VolumeSlices
from ..sam2.session import VolumeSession
from .matching import Matches
from .memory import SupportEntries

log = logging.getLogger(__name__)


def merged_segments(supports: Sequence[SupportCase]) -> tuple[Segment, ...]:
    """The structures of all supports, by name; values and colours from the first that has each.

    A structure a support lists but labels no voxel of is left out (another support may label it);
    one that no support labels is not segmented, and a warning says so. Errors name the support's file."""
    by_name: dict[str, Segment] = {}
    listed: dict[str, str] = {}  # structure -> the first support that lists it without a voxel
    for support in supports:
        image, labels = support
        if image.array.ndim != 3:
            raise InputError(f"{support.name} is not a 3D volume")
        image.require_same_grid(labels.volume, f"{support.name} labels")
        present = set(np.unique(labels.volume.array).tolist()) - {0}
        if not present:
            raise InputError(f"{support.name} has no labelled voxel")
        for seg in labels.segments:
            if seg.value not in present:
                listed.setdefault(seg.name, support.name)
                continue
            known = by_name.get(seg.name)
            if known is None:
                if any(s.value == seg.value for s in by_name.values()):
                    raise InputError(f"{support.name}: structure '{seg.name}' uses label value {seg.value}, "
                                     "which another support gives to a different structure")
                by_name[seg.name] = seg
            elif known.value != seg.value:
                raise InputError(f"structure name '{seg.name}' has value {known.value} in one support and "
                                 f"{seg.value} in {support.name}")
    for structure, name in listed.items():
        if structure not in by_name:
            log.warning("%s lists the structure '%s' but no support labels a voxel of it: it is not segmented",
                        name, structure)
    return tuple(sorted(by_name.values(), key=lambda s: s.value))


def support_entries(supports: Sequence[SupportCase], session: VolumeSession, segments, augmentations: int,
                    slices_per_structure: int, middle: bool, seed: int) -> SupportEntries:
    """Representative support slices per structure (each structure's middle one when ``middle``, else
    spread over its extent), ``augmentations`` copies each, cut like the query's slices.

    They are stacked at the supports' own largest slice size, not the query's: the model sees every
    frame at its image size anyway, and entries that do not depend on the query (supports already in
    the query's frame, or queries of one geometry) are encoded once for a whole cohort (support_store.py).
    ``support_slice`` counts slices of the grid a slice was cut from (the support's own unless
    ``support_reoriented``); ``support_offset_mm`` places it along the query's slice normal.
    """
    from .augment import augment_slices
    from .slices import select_support_slices, stack_support

    query, axis = session.volume, session.axis
    size = support_slice_size(supports, query, axis)
    normal = query.direction_matrix[:, 2 - axis]
    wanted = {seg.value for seg in segments}
    images, masks, structure, meta = [], [], [], []
    for case, support in enumerate(supports):
        # the same objects when aligned
        image, labels = support_in_query_frame(support.image, support.labels, query, axis)
        image01 = VolumeSlices(image.array, axis, session.normalization)  # percentiles: each support its own
        present = sorted(wanted & set(np.unique(labels.volume.array).tolist()))
        if not present:
            continue
        picked = select_support_slices(image01, labels, axis, slices_per_structure, case, present,
                                       rule="middle" if middle else "spread")
        imgs, msks = stack_support(picked, size)
        aug = augment_slices(imgs, msks, augmentations, seed=seed + case, device=session.predictor.device)
        for m in range(aug.images.shape[0]):
            src = picked[int(aug.source[m])]
            structure.append(src.value)
            meta.append({"support_case": case, "support_slice": src.index,
                         "support_offset_mm": _offset_mm(image, axis, src.index, normal),
                         "support_reoriented": image is not support.image,
                         "relative_position": round(src.position, 4), "augmentation": aug.params[m].as_dict()})
        images.append(aug.images.cpu())
        masks.append(aug.masks.cpu())
    if not images:
        raise InputError("the supports have no slice with the chosen structures")
    return SupportEntries(torch.cat(images), torch.cat(masks), np.asarray(structure), meta)


def support_slice_size(supports: Sequence[SupportCase], query: Volume, axis: int) -> tuple[int, int]:
    """(H, W): the largest slice of any support cut like the query's (from the headers: nothing resampled)."""
    shapes = [np.delete(query_frame_shape(support.image, query, axis), axis) for support in supports]
    return int(max(s[0] for s in shapes)), int(max(s[1] for s in shapes))


def _offset_mm(image: Volume, axis: int, index: int, normal: np.ndarray) -> float:
    """Where a support slice lies along the query's slice normal (LPS mm): comparable however the
    support is stored, where ``support_slice`` counts slices of the grid it was cut from."""
    ijk = np.zeros(4)
    ijk[2 - axis], ijk[3] = index, 1.0
    return round(float(normal @ (image.ijk_to_lps() @ ijk)[:3]), 3)


def match_entries(session: VolumeSession, entries: SupportEntries, support_cache: FeatureCache, features: str,
                  position_weight: float, top_k: int, context: RunContext = RunContext()) -> Matches:
    """Top-k support entries of each structure for every query slice, by SAM2's encoder features (which
    propagation needs anyway) or by intensity."""
    from .features import IntensityFeatures
    from .matching import match_slices, relative_positions

    if features == "sam2":
        q, s = session.cache.embed_all(progress=context.progress), support_cache.embed_all(progress=context.progress)
    else:
        extractor = IntensityFeatures()
        q, s = extractor.embed(session.frames.slices01), extractor.embed(entries.images01)
    positions = relative_positions(session.num_slices, *(context.frame_range or (None, None)))
    return match_slices(q, s, positions, np.array([m["relative_position"] for m in entries.meta]),
                        position_weight, entries.structure, top_k)


def fixed_matches(entries: SupportEntries, num_query: int, top_k: int) -> Matches:
    """Every query slice gets the same entries per structure (the first ``top_k``, in support order):
    FS-MedSAM2's fixed support, with no similarity involved."""
    picks, nan = {}, {}
    for value in np.unique(entries.structure):
        rows = np.flatnonzero(entries.structure == value)[:top_k]
        picks[int(value)] = np.tile(rows, (num_query, 1))
        nan[int(value)] = np.full(picks[int(value)].shape, np.nan, dtype=np.float32)
    return Matches(picks, nan, nan)
