"""Support-guided prompts: a pseudo-mask per query slice becomes a prompt that SAM2 refines.

The pseudo-mask comes from a prior: the support cases registered onto the query (registration,
CPU only), or SAM2 itself conditioned on support memories with no prompt on the query slice
(sam2). On every slice where a structure's pseudo-mask is not empty it becomes a box (its bounding
box grown by a margin) and/or a dense mask hint; SAM2 segments those slices from the prompts and
propagates into the slices the prior left empty. A hint is refined, never copied: unlike a mask
prompt, it is not kept verbatim in the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..common.choices import PRIORS, PROMPT_TYPES
from ..common.context import RunContext
from ..common.errors import InputError
from ..io.volume import LabelMap, SupportCase
from ..sam2.conditioning import MemoryPolicy, Prompt
from ..support.lora_settings import LoraSettings, require_peft
from .common import MethodInputs, build_report
from .matched_support import FewShotParams
from .options import FUSION, SUPPORT_OPTIONS, TRANSFORM, Option

if TYPE_CHECKING:
    from ..sam2.session import VolumeSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuidedParams:
    prior: str = "registration"
    prompt_type: str = "box+mask"
    box_margin: int = 5  # pixels added on every side of the pseudo-mask's bounding box
    transform: str = "affine"  # registration prior: affine or affine_bspline
    fusion: str = "weighted"  # registration prior with several supports: majority, staple or weighted
    fewshot: FewShotParams = field(default_factory=lambda: FewShotParams(scheme="video"))  # sam2 prior
    max_prompt_memories: int = 4  # prompted slices conditioning an unprompted one: the nearest
    lora: LoraSettings = field(default_factory=LoraSettings)  # steps > 0: adapt SAM2 to the supports first

    def check(self) -> None:
        if self.prior not in PRIORS:
            raise InputError(f"unknown prior '{self.prior}': use {' or '.join(PRIORS)}")
        if self.prompt_type not in PROMPT_TYPES:
            raise InputError(f"unknown prompt type '{self.prompt_type}': use {', '.join(PROMPT_TYPES)}")
        if self.box_margin < 0:
            raise InputError(f"the box margin must be 0 or more pixels, got {self.box_margin}")
        if self.max_prompt_memories < 2:
            raise InputError("at least 2 prompted slices must condition each unprompted slice")
        self.fewshot.check()  # used by the sam2 prior; never left invalid
        self.lora.check()
        if self.lora.steps:
            require_peft()


Params = GuidedParams
# The supports' options reach the sam2 prior's matched supports; --prior-scheme is its scheme.
OPTIONS = (Option("--prior", "pseudo-masks from registering the supports, or from SAM2 with support memories and no "
                             "prompt on the query slice", PRIORS).at(),
           Option("--prior-scheme", "with --prior sam2: how support memories condition it", ("pair", "video"))
           .at("fewshot.scheme"),
           Option("--prompt-type", "the pseudo-mask's box, the pseudo-mask as a dense hint SAM2 refines, or both",
                  PROMPT_TYPES).at(),
           Option("--box-margin", "pixels added around each box").at(),
           Option("--lora-steps", "first fit LoRA adapters on the supports' augmented slices for N steps (0: off; "
                                  "adapters are cached per support set; needs the lora extra)").at("lora.steps"),
           Option("--lora-rank", "LoRA rank").at("lora.rank"),
           Option("--lora-decoder", "LoRA on the mask decoder's attention too, not only the image encoder's")
           .at("lora.decoder"),
           TRANSFORM.at(), FUSION.at(), *(o.at(f"fewshot.{o.dest}") for o in SUPPORT_OPTIONS))


def pseudo_masks(session: VolumeSession, supports: Sequence[SupportCase], params: GuidedParams,
                 context: RunContext = RunContext()) -> tuple[LabelMap, dict]:
    """The prior's label map on the query's grid, and the prior's own report."""
    if params.prior == "registration":
        from .registration import registration_segment

        return registration_segment(session.volume, supports, params.transform, params.fusion, context)
    from .matched_support import segment_fewshot

    return segment_fewshot(session, supports, params.fewshot, context)


def box_from_mask(mask: np.ndarray, margin: int = 0) -> tuple[float, float, float, float] | None:
    """x0, y0, x1, y1 (inclusive pixel indices) of the mask, grown by ``margin``, clipped to the slice."""
    rows = np.flatnonzero(np.any(mask, axis=1))
    cols = np.flatnonzero(np.any(mask, axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return (float(max(0, cols[0] - margin)), float(max(0, rows[0] - margin)),
            float(min(w - 1, cols[-1] + margin)), float(min(h - 1, rows[-1] + margin)))


def prompts_from_pseudo_masks(
    slice_labels: np.ndarray,
    values: Sequence[int],
    prompt_type: str = "box+mask",
    margin: int = 5,
    frame_range: tuple[int, int] | None = None,
) -> list[Prompt]:
    """One prompt per structure and slice where its pseudo-mask (N, H, W) has voxels; none elsewhere."""
    if prompt_type not in PROMPT_TYPES:
        raise InputError(f"unknown prompt type '{prompt_type}': use {', '.join(PROMPT_TYPES)}")
    kinds = set(prompt_type.split("+"))
    lo, hi = frame_range if frame_range is not None else (0, len(slice_labels) - 1)
    prompts = []
    for value in values:
        hit = slice_labels == value
        for t in np.flatnonzero(hit.any(axis=(1, 2))):
            if lo <= t <= hi:
                prompts.append(Prompt(frame=int(t), obj_id=int(value),
                                      box=box_from_mask(hit[t], margin) if "box" in kinds else None,
                                      mask_hint=hit[t] if "mask" in kinds else None))
    return prompts


class NearestPromptsPolicy(MemoryPolicy):
    """An unprompted slice attends to its nearest prompted slices only, by sam2's own rule
    (``max_cond_frames_in_attn``; the others still serve as its memories of neighbouring slices).

    Guided prompts cover most slices; attending to all of them would make every unprompted slice
    cost as much as the whole volume.
    """

    def __init__(self, max_prompts: int):
        self.max_cond_frames = max_prompts


def segment_guided(session: VolumeSession, supports: Sequence[SupportCase], params: GuidedParams = GuidedParams(),
                   context: RunContext = RunContext()) -> tuple[LabelMap, dict]:
    """The supports' structures in the query, SAM2 prompted on every slice the prior marks."""
    from ..sam2.propagation import propagate

    params.check()
    if not supports:
        raise InputError("no support case was given")
    start = time.perf_counter()
    encoded_before = session.cache.encoded_frames
    prior_labels, prior_report = pseudo_masks(session, supports, params, context)
    slices = session.slices_of(prior_labels.volume.array)
    values = [s.value for s in prior_labels.segments]
    prompts = prompts_from_pseudo_masks(slices, values, params.prompt_type, params.box_margin, context.frame_range)
    if not prompts:
        raise InputError(f"the {params.prior} prior found none of the supports' structures in the query: "
                         "there is nothing to prompt SAM2 with")
    prompted = {p.obj_id for p in prompts}
    segments = [s for s in prior_labels.segments if s.value in prompted]
    result = propagate(session.predictor, session.frames, prompts, cache=session.cache,
                       policy=NearestPromptsPolicy(params.max_prompt_memories), context=context)
    labels = session.to_labelmap(result.labels, segments)
    report = build_report("guided", session, result, segments, time.perf_counter() - start,
                          session.cache.encoded_frames - encoded_before)
    _add_prior_to_slices(report, slices, prompts, segments, params.prior)
    report["structures"] += _not_prompted(prior_labels.segments, prompted, params.prior)
    report["guided"] = {
        "prior": params.prior, "prompt_type": params.prompt_type, "box_margin": params.box_margin,
        "prompted_slices": len({p.frame for p in prompts}), "prompts": len(prompts),
        "structures_without_prompt": [s.name for s in prior_labels.segments if s.value not in prompted],
        "prior_report": _prior_summary(prior_report),
    }
    return labels, report


def _not_prompted(segments, prompted: set, prior: str) -> list[dict]:
    """A structure the prior marks on no slice gets no prompt, so SAM2 never sees it: the report and
    a warning say it was not found, as every other method says of a structure it did not find."""
    out = []
    for seg in segments:
        if seg.value not in prompted:
            log.warning("%s: not found in the query (the %s prior marks no slice of it)", seg.name, prior)
            out.append({"value": seg.value, "name": seg.name, "status": "not found", "voxels": 0, "slices": 0,
                        "best_object_score": None, "best_slice": None})
    return out


def _add_prior_to_slices(report: dict, slices: np.ndarray, prompts: Sequence[Prompt], segments, prior: str) -> None:
    """Per slice and structure: which prior made its prompt (None: propagated), and its pseudo-mask size."""
    prompted = {(p.frame, p.obj_id) for p in prompts}
    for t, entry in enumerate(report["slices"]):
        for seg in segments:
            obj = entry["objects"][seg.name]
            obj["prior"] = prior if (t, seg.value) in prompted else None
            obj["pseudo_voxels"] = int(np.count_nonzero(slices[t] == seg.value))


def _prior_summary(prior_report: dict) -> dict:
    """The prior's report without its per-slice part (the guided report has its own)."""
    return {k: v for k, v in prior_report.items() if k not in ("slices", "session", "segments")}


def run(inputs: MethodInputs, params: GuidedParams) -> tuple[LabelMap, dict]:
    """Guided prompts, on a LoRA-adapted copy of the model when ``params.lora.steps`` asks for one."""
    session, lora_report = inputs.session, None
    if params.lora.steps > 0:
        from ..support.lora import adapted_session

        model_id = "|".join(str(v) for v in inputs.model.key())
        session, lora_report = adapted_session(session, inputs.supports, params.lora, model_id, inputs.context)
    labels, report = segment_guided(session, inputs.supports, params, inputs.context)
    report["lora"] = lora_report
    return labels, report
