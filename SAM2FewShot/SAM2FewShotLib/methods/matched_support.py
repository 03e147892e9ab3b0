"""Matched support: segment every structure of labelled support cases in a query, with no clicks.

Support slices are augmented, embedded (SAM2's own encoder features, reused for propagation, or
plain intensity), matched to every query slice (support/entries.py), and their image+mask pairs
condition SAM2 as memories (methods/memory_conditioned.py). The query's own labels are never read here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..common.choices import SCHEMES, SUPPORT_SELECTIONS
from ..common.choices import SIMILARITY_FEATURES as FEATURES
from ..common.context import RunContext
from ..common.errors import InputError
from ..io.volume import LabelMap, SupportCase
from .common import MethodInputs
from .options import (
    AUGMENTATIONS,
    MEMORY_OPTIONS,
    POSITION_WEIGHT,
    SCHEME,
    SIMILARITY,
    SLICES_PER_STRUCTURE,
    MemoryParams,
)

if TYPE_CHECKING:
    from ..sam2.session import VolumeSession


@dataclass(frozen=True)
class FewShotParams(MemoryParams):
    scheme: str = "video+memory"
    augmentations: int = 4  # augmented copies per support slice (the original is one of them)
    slices_per_structure: int = 8
    features: str = "sam2"  # or "intensity"
    position_weight: float = 0.0
    seed: int = 0
    selection: str = "matched"  # or "middle": every slice gets each structure's middle support slice

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown scheme '{self.scheme}': use one of {', '.join(SCHEMES)}")
        if self.features not in FEATURES:
            raise InputError(f"unknown features '{self.features}': use {' or '.join(FEATURES)}")
        if self.augmentations < 1 or self.slices_per_structure < 1 or self.top_k < 1:
            raise InputError("augmentations, slices per structure and top-k must be at least 1")
        if self.selection not in SUPPORT_SELECTIONS:
            raise InputError(f"unknown selection '{self.selection}': use one of {', '.join(SUPPORT_SELECTIONS)}")
        super().check()
        if self.scheme != "video+memory" and (self.placement, self.passes) != (MemoryParams.placement,
                                                                                MemoryParams.passes):
            raise InputError(f"placement and passes apply to the video+memory scheme, not to {self.scheme}")


Params = FewShotParams
OPTIONS = (SCHEME.at(), AUGMENTATIONS.at(), SLICES_PER_STRUCTURE.at(), SIMILARITY.at(), POSITION_WEIGHT.at(),
           *MEMORY_OPTIONS)


def segment_fewshot(session: VolumeSession, supports: Sequence[SupportCase], params: FewShotParams = FewShotParams(),
                    context: RunContext = RunContext()) -> tuple[LabelMap, dict]:
    """Every structure of the supports, segmented in the query; the report says what conditioned each slice."""
    from ..common.digests import bytes_digest
    from ..sam2.frames import FrameSource
    from ..support.entries import fixed_matches, match_entries, merged_segments, support_entries
    from .memory_conditioned import Conditioning, Tally, memory_report, segment_with_memories

    params.check()
    if not supports:
        raise InputError("no support case was given")
    tally = Tally(session)
    supports = SupportCase.listed(supports)
    segments = merged_segments(supports)
    predictor = session.predictor
    entries = support_entries(supports, session, segments, params.augmentations, params.slices_per_structure,
                              params.selection == "middle", params.seed)
    key = bytes_digest(entries.images01.numpy().tobytes(), entries.masks.numpy().tobytes())
    cache = tally.watch(session.support_cache(key, FrameSource(entries.images01, predictor.image_size)))
    if params.selection == "middle":
        matches = fixed_matches(entries, session.num_slices, params.top_k)
    else:
        matches = match_entries(session, entries, cache, params.features, params.position_weight, params.top_k,
                                context)
    conditioning = Conditioning(entries, matches, cache, segments, params.scheme)
    labels, report = segment_with_memories("matched-support", session, conditioning, params, context, tally)
    report["fewshot"] = {"scheme": params.scheme, "augmentations": params.augmentations,
                         "slices_per_structure": params.slices_per_structure, "features": params.features,
                         "selection": params.selection, **memory_report(params, len(entries)),
                         "supports": len(supports)}
    return labels, report


def run(inputs: MethodInputs, params: FewShotParams) -> tuple[LabelMap, dict]:
    return segment_fewshot(inputs.session, inputs.supports, params, inputs.context)
