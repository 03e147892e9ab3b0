"""Propagation of prompts through a volume, forward and backward, with all objects in one pass.

sam2's ``propagate_in_video`` goes one way from one start frame. Here every prompted slice
propagates both ways: a forward pass from the first prompted slice to the end, a backward pass
from the last one to the start, each from the prompts alone; per object, a slice takes the pass
whose source prompt is nearer (both, averaged, at equal distance). Memory outputs far behind the
current slice are dropped as the pass goes, a slice the backward pass cannot change is final after
the forward pass, and forward logits that must wait for the backward pass beyond a small budget go
to a scratch file: memory does not grow with the number of slices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..common.context import RunContext
from ..common.errors import InputError
from ..common.progress import PROPAGATE_BACKWARD, PROPAGATE_FORWARD
from .conditioning import MemoryPolicy, Prompt
from .devices import model_autocast
from .estimate import PassClock
from .feature_cache import FeatureCache
from .frames import FrameSource
from .offload import OffloadedDict

MASK_LOGIT = 1.0e4  # a mask prompt's own slice: certain inside, certain outside


@dataclass
class PropagationResult:
    labels: np.ndarray  # (N, H, W) object ids, 0 background
    obj_ids: list[int]
    object_scores: np.ndarray  # (N, n_obj) object-score logits, NaN where not computed
    sources: list[dict[int, str]]  # per slice: obj id -> where its mask came from
    seconds: np.ndarray  # (N,) model time per slice
    visited: np.ndarray  # (N, 2) bool: visited by the forward / backward pass
    prompt_model_masks: dict[int, np.ndarray] = field(default_factory=dict)  # model output on prompted slices
    details: list[dict] = field(default_factory=list)  # per slice: policy report entries


@dataclass
class PropagationCall:
    """One propagate() call as a watcher sees it once it returns: its inputs and every slice's
    merged logits (compared with stock sam2 by bench/equivalence.py)."""

    predictor: object
    frames: FrameSource
    prompts: list[Prompt]
    policy: MemoryPolicy
    frame_range: tuple[int, int]
    obj_ids: list[int]
    logits: dict[int, torch.Tensor]  # slice -> (n_obj, H, W), before mask prompts replace their slice's


_watchers: list[Callable[[PropagationCall], None]] = []


@contextmanager
def watched(callback: Callable[[PropagationCall], None]) -> Iterator[None]:
    """Hand every propagate() call made inside the block to ``callback`` as it returns, while the
    model is exactly as the call saw it (a LoRA adapter is still applied)."""
    _watchers.append(callback)
    try:
        yield
    finally:
        _watchers.remove(callback)


def propagate(
    predictor,
    frames: FrameSource,
    prompts: Sequence[Prompt],
    cache: FeatureCache | None = None,
    policy: MemoryPolicy | None = None,
    context: RunContext = RunContext(),
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
    bounds: Mapping[int, tuple[int, int]] | None = None,
) -> PropagationResult:
    """Segment every slice of ``frames`` (or the context's frame range, inclusive) from the prompts.

    ``bounds``: object id -> its first and last slice (inclusive); outside them the object has no
    voxel, and a voxel goes to another object whose logit is positive there (a ROI's extent).

    ``on_logits(slice, logits)`` receives each slice's merged (n_obj, H, W) logits as the passes
    decide them, before a mask prompt replaces its own slice's: what the equivalence checks
    compare with stock sam2 (bench/equivalence.py).
    """
    policy = policy or MemoryPolicy()
    if not prompts and not policy.obj_ids:
        raise InputError("no prompt was given: nothing to propagate")
    n = len(frames)
    lo, hi = context.frame_range if context.frame_range is not None else (0, n - 1)
    for p in prompts:
        if not 0 <= p.frame < n:
            raise InputError(f"prompt on slice {p.frame} is outside the volume (0..{n - 1})")
    with torch.inference_mode(), model_autocast(predictor), _cond_frame_limit(predictor, policy.max_cond_frames):
        state = predictor.init_volume_state(frames, cache=cache)
        obj_ids = sorted({p.obj_id for p in prompts} | set(policy.obj_ids))
        _add_prompts(predictor, state, prompts, obj_ids)
        policy.prepare(predictor, state)
        predictor.propagate_in_video_preflight(state)
        seen: dict[int, torch.Tensor] = {}
        if _watchers:
            on_logits = _also(on_logits, seen.__setitem__)
        run = _Run(predictor, state, prompts, obj_ids, policy, context, (lo, hi), on_logits, bounds)
        result = run.execute()
    if _watchers:
        call = PropagationCall(predictor, frames, list(prompts), policy, (lo, hi), obj_ids, seen)
        for watcher in list(_watchers):
            watcher(call)
    return result


@contextmanager
def _cond_frame_limit(predictor, limit: int | None) -> Iterator[None]:
    previous = predictor.max_cond_frames_in_attn
    if limit is not None:
        predictor.max_cond_frames_in_attn = int(limit)
    try:
        yield
    finally:
        predictor.max_cond_frames_in_attn = previous


def _also(first: Callable | None, second: Callable) -> Callable:
    def both(t: int, logits: torch.Tensor) -> None:
        if first is not None:
            first(t, logits)
        second(t, logits)
    return both


def _add_prompts(predictor, state: dict, prompts: Sequence[Prompt], obj_ids: list[int]) -> None:
    for obj_id in obj_ids:  # object indices follow id order, whatever the prompt order
        predictor._obj_id_to_idx(state, obj_id)
    for p in sorted(prompts, key=lambda q: (q.frame, q.obj_id)):
        if p.mask is not None:
            mask = np.asarray(p.mask, dtype=bool)
            if mask.shape != (state["video_height"], state["video_width"]):
                raise InputError(f"mask prompt on slice {p.frame} has shape {mask.shape}, slices are "
                                 f"{(state['video_height'], state['video_width'])}")
            if not mask.any() and not p.erased:
                raise InputError(f"the mask prompt for label {p.obj_id} on slice {p.frame} is empty")
            predictor.add_new_mask(state, p.frame, p.obj_id, torch.from_numpy(mask))
        else:
            if p.box is None and p.points is None and p.mask_hint is None:
                raise InputError(f"prompt for label {p.obj_id} on slice {p.frame} has no mask, box or points")
            if p.mask_hint is not None and np.shape(p.mask_hint) != (state["video_height"], state["video_width"]):
                raise InputError(f"mask hint on slice {p.frame} has shape {np.shape(p.mask_hint)}, slices are "
                                 f"{(state['video_height'], state['video_width'])}")
            labels = None if p.points is None else np.asarray(p.point_labels, dtype=np.int32)
            predictor.add_box_with_mask_hint(
                state, p.frame, p.obj_id,
                points=None if p.points is None else np.asarray(p.points, dtype=np.float32),
                labels=labels,
                box=None if p.box is None else np.asarray(p.box, dtype=np.float32),
                mask_hint=p.mask_hint,
            )


def label_dtype(max_id: int) -> np.dtype:
    """The smallest unsigned type that holds these label values: one byte per voxel for most maps."""
    return np.dtype(np.uint8 if max_id < 256 else np.uint16 if max_id < 65536 else np.int32)


def labels_from_logits(logits: torch.Tensor, obj_ids: Sequence[int]) -> np.ndarray:
    """(n_obj, H, W) logits -> (H, W) ids: each voxel goes to the highest positive logit, else 0."""
    best = logits.max(dim=0)
    ids = torch.tensor(list(obj_ids), dtype=torch.int32)
    return torch.where(best.values > 0, ids[best.indices], 0).numpy()


def choose_pass(t: int, before: int | None, after: int | None, forward: bool, backward: bool) -> str:
    """Which pass decides slice ``t`` for an object: the one whose source prompt (``before`` or
    ``after`` it) is nearer; 'both' (averaged) at equal distance. The passes that ran are given."""
    if not (forward and backward):
        return "forward" if not backward else "backward"
    df = t - before if before is not None else np.inf
    db = after - t if after is not None else np.inf
    return "forward" if df < db else "backward" if db < df else "both"


class _Run:
    """One propagation: two passes, their merge, and the bookkeeping for the report."""

    def __init__(self, predictor, state, prompts, obj_ids, policy: MemoryPolicy, context: RunContext,
                 frame_range: tuple[int, int], on_logits, bounds: Mapping[int, tuple[int, int]] | None = None):
        self.predictor, self.state, self.policy, self.on_logits = predictor, state, policy, on_logits
        self.bounds = {obj_ids.index(v): (int(a), int(b)) for v, (a, b) in (bounds or {}).items() if v in obj_ids}
        self.obj_ids, self.context = obj_ids, context
        self.lo, self.hi = frame_range
        self.n, self.h, self.w = len(state["images"]), state["video_height"], state["video_width"]
        n_obj = len(obj_ids)
        self.prompt_frames = [sorted({q.frame for q in prompts if q.obj_id == o}) for o in obj_ids]
        self.mask_prompts = {(q.frame, obj_ids.index(q.obj_id)): np.asarray(q.mask, bool)
                             for q in prompts if q.mask is not None}
        self.prompt_kind = {(q.frame, obj_ids.index(q.obj_id)): q.kind for q in prompts}
        self.scores = np.full((self.n, n_obj), np.nan, dtype=np.float32)
        self.seconds = np.zeros(self.n)
        self.visited = np.zeros((self.n, 2), dtype=bool)
        self.labels = np.zeros((self.n, self.h, self.w), dtype=label_dtype(max(obj_ids, default=0)))
        self.final = np.zeros(self.n, dtype=bool)  # slices whose labels no later pass changes
        self.sources: list[dict[int, str]] = [dict() for _ in range(self.n)]
        self.details: list[dict] = [dict() for _ in range(self.n)]
        self.pending = OffloadedDict()  # forward logits awaiting the backward pass
        self.prompt_model_masks: dict[int, np.ndarray] = {}
        if prompts:  # from the first prompt forward, from the last one backward
            first = min(q.frame for q in prompts)
            last = max(q.frame for q in prompts)
        elif policy.passes == "middle-out":
            first = self.lo + (self.hi - self.lo + 1) // 2 + 1
            last = first - 1
        else:  # conditioned by memories alone: every slice, once or both ways
            both = policy.temporal and policy.passes == "both"
            first, last = self.lo, (self.hi if both else self.lo - 1)
        self.middle_out = not prompts and policy.passes == "middle-out"
        self.forward = list(range(max(first, self.lo), self.hi + 1)) if first <= self.hi else []
        self.backward = list(range(min(last, self.hi), self.lo - 1, -1)) if last >= self.lo else []
        self.window = max(predictor.num_maskmem * predictor.memory_temporal_stride_for_eval,
                          predictor.max_obj_ptrs_in_encoder) + 1
        self.clock = PassClock(len(self.forward) + len(self.backward), predictor.image_size, predictor.device.type)

    def execute(self) -> PropagationResult:
        if self.middle_out:  # the forward pass goes on from the backward pass's memory
            self._pass(self.backward, reverse=True)
            self._pass(self.forward, reverse=False)
        else:  # each pass from the prompts alone
            self._pass(self.forward, reverse=False)
            self._reset_temporal_memory()
            self._pass(self.backward, reverse=True)
        for t in self.pending.keys():  # frames no backward pass reached
            self._finalize(t, self.pending.pop(t), None)
        self.pending.close()
        return PropagationResult(self.labels, self.obj_ids, self.scores, self.sources, self.seconds,
                                 self.visited, self.prompt_model_masks, self.details)

    def _pass(self, order: list[int], reverse: bool) -> None:
        stage = PROPAGATE_BACKWARD if reverse else PROPAGATE_FORWARD
        for n, t in enumerate(order):
            self.context.check_cancelled()
            start = time.perf_counter()
            logits, scores = self._frame(t, reverse)
            self.seconds[t] += time.perf_counter() - start
            self.visited[t, int(reverse)] = True
            self._merge(t, logits, scores, reverse)
            self._trim(t, reverse)
            self.clock.step()
            self.context.report(stage, n + 1, len(order))

    def _frame(self, t: int, reverse: bool) -> tuple[torch.Tensor, np.ndarray]:
        """(n_obj, H, W) logits at slice resolution and (n_obj,) object scores for slice t."""
        masks, scores = [], []
        for o in range(len(self.obj_ids)):
            od = self.state["output_dict_per_obj"][o]
            if t in od["cond_frame_outputs"]:
                out = od["cond_frame_outputs"][t]
            else:
                view = {
                    "cond_frame_outputs": self.policy.cond_outputs(o, t, reverse, od["cond_frame_outputs"]),
                    "non_cond_frame_outputs": od["non_cond_frame_outputs"] if self.policy.temporal else {},
                }
                length, self.state["num_frames"] = self.state["num_frames"], (
                    self.policy.video_length(o, t) or self.state["num_frames"])
                try:
                    out, _ = self.predictor._run_single_frame_inference(
                        inference_state=self.state, output_dict=view, frame_idx=t, batch_size=1,
                        is_init_cond_frame=False, point_inputs=None, mask_inputs=None, reverse=reverse,
                        run_mem_encoder=self.policy.temporal,
                    )
                finally:
                    self.state["num_frames"] = length
                if self.policy.temporal:
                    od["non_cond_frame_outputs"][t] = out
                self.state["frames_tracked_per_obj"][o][t] = {"reverse": reverse}
                entry = self.policy.describe(o, t)
                if entry:
                    self.details[t][self.obj_ids[o]] = entry
            masks.append(out["pred_masks"].to(self.state["device"]).float())
            scores.append(float(out["object_score_logits"].float().reshape(-1)[0]))
        low = torch.cat(masks, dim=0)  # (n_obj, 1, h, w)
        logits = F.interpolate(low, size=(self.h, self.w), mode="bilinear", align_corners=False)[:, 0]
        return logits.to("cpu", torch.float32), np.asarray(scores, dtype=np.float32)

    def _source_frames(self, o: int, t: int) -> tuple[int | None, int | None]:
        before = [f for f in self.prompt_frames[o] if f <= t]
        after = [f for f in self.prompt_frames[o] if f >= t]
        return (before[-1] if before else None), (after[0] if after else None)

    def _merge(self, t: int, logits: torch.Tensor, scores: np.ndarray, reverse: bool) -> None:
        if not reverse:
            self.scores[t] = scores
            if self._waits_for_backward(t):
                self.pending[t] = logits
            else:
                self._finalize(t, logits, None)
            return
        if not self.final[t]:
            self._finalize(t, self.pending.pop(t, None), logits, scores)

    def _waits_for_backward(self, t: int) -> bool:
        """Whether some object of slice t will take (or average in) the backward pass's result."""
        if not self.backward or not self.lo <= t <= self.backward[0]:
            return False
        for o in range(len(self.obj_ids)):
            before, after = self._source_frames(o, t)
            if (t, o) not in self.prompt_kind and choose_pass(t, before, after, True, True) != "forward":
                return True
        return False

    def _finalize(self, t: int, fwd: torch.Tensor | None, bwd: torch.Tensor | None,
                  bwd_scores: np.ndarray | None = None) -> None:
        """Choose, per object, the pass whose prompt is nearer; then resolve objects by logit."""
        merged = torch.empty((len(self.obj_ids), self.h, self.w))
        for o, obj_id in enumerate(self.obj_ids):
            before, after = self._source_frames(o, t)
            choice = choose_pass(t, before, after, fwd is not None, bwd is not None)
            if (t, o) in self.prompt_kind:
                merged[o] = (fwd if fwd is not None else bwd)[o]
                self.sources[t][obj_id] = f"{self.prompt_kind[(t, o)]} prompt"
                self.prompt_model_masks.setdefault(t, np.zeros((len(self.obj_ids), self.h, self.w), bool))[o] = (
                    merged[o].numpy() > 0)
            elif choice == "forward":
                merged[o] = fwd[o]
                self.sources[t][obj_id] = f"forward from slice {before}" if before is not None else "forward pass"
            elif choice == "backward":
                merged[o] = bwd[o]
                self.scores[t, o] = bwd_scores[o]
                self.sources[t][obj_id] = f"backward from slice {after}" if after is not None else "backward pass"
            else:
                merged[o] = 0.5 * (fwd[o] + bwd[o])
                self.scores[t, o] = 0.5 * (self.scores[t, o] + bwd_scores[o])
                self.sources[t][obj_id] = (f"forward from slice {before} + backward from slice {after}"
                                           if before is not None else "forward + backward passes")
        if self.on_logits is not None:
            self.on_logits(t, merged.clone())
        for o in range(len(self.obj_ids)):
            if (t, o) in self.mask_prompts:  # the user's mask is kept verbatim
                m = torch.from_numpy(self.mask_prompts[(t, o)])
                merged[o] = torch.where(m, MASK_LOGIT, -MASK_LOGIT)
        for o, (first, last) in self.bounds.items():
            if not first <= t <= last:  # outside the object's slice bounds: never this object
                merged[o] = -MASK_LOGIT
                self.sources[t][self.obj_ids[o]] = "outside its slice bounds"
        self.labels[t] = labels_from_logits(merged, self.obj_ids)
        self.final[t] = True

    def _trim(self, t: int, reverse: bool) -> None:
        """Drop prediction memories that no later slice of this pass can attend to."""
        old = t + self.window if reverse else t - self.window
        if self.middle_out and reverse and self.forward and old >= self.forward[0] - self.window:
            return  # the forward pass starts from these
        for od in self.state["output_dict_per_obj"].values():
            od["non_cond_frame_outputs"].pop(old, None)

    def _reset_temporal_memory(self) -> None:
        for od in self.state["output_dict_per_obj"].values():
            od["non_cond_frame_outputs"].clear()
