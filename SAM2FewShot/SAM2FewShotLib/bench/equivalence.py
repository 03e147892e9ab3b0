"""Proof by equivalence: our SAM2 path gives the logits stock sam2 gives for the same conditioning.

No pretrained weights can be had where this is developed, so no accuracy of the SAM2 methods is
measured here. What can be shown is that SAM2 is fed exactly what the stock predictor is fed:
then published accuracy applies, and a later difference comes from a documented choice. Each
propagate() call of a method is replayed on a stock twin: sam2's own ``SAM2VideoPredictor``
sharing the model's weights, its inference state made by its own ``init_state`` and then given
the same float frames (no JPEG round trip), its prompts added with ``add_new_mask`` /
``add_new_points_or_box`` and its frames tracked by ``propagate_in_video``.

Where we differ by design, the replay applies our rule to stock outputs, and says so:
  memories      kept in float32 off CUDA (stock sam2 stores bfloat16, meant for CUDA autocast);
  passes        the backward pass starts from the prompts alone: stock reverse runs on a fresh
                state rather than after the forward pass;
  merge         per object, the pass whose prompt is nearer decides a slice (averaged at equal
                distance); stock leaves merging to its caller;
  mask prompts  a mask-prompted slice returns the user's mask: the model's output there is compared;
  supports      pair and video: one stock video per query slice and structure, [e_k-1 .. e_0, q],
                the matched supports mask-prompted; video+memory: the query as one stock video
                whose conditioning frames are swapped for each slice's own supports between steps
                of ``propagate_in_video`` (FATE-SAM's mechanism), placed as the policy places them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor

from ..sam2.devices import model_autocast
from ..sam2.frames import model_input
from ..sam2.predictor import Float32Memories, MaskHintPrompts
from ..sam2.propagation import MemoryPolicy, Prompt, PropagationCall, choose_pass, labels_from_logits, watched
from ..support.memory import SupportMemoryPolicy

# On logits, float32 on the CPU: ours against stock sam2 (measured at most 3.1e-7 with an AMD EPYC, every
# method, 8 slices at 128 px: the two differ only in the order of some sums), and also the bound a
# request's logits keep across machines (README, Cohorts; Testing/sam2/test_precision.py measures another
# set of this CPU's kernels at 4.5e-6 to 1.3e-5).
TOLERANCE = 1e-4
# Under CUDA bfloat16 autocast (8 significand bits) the encoder's batched and single-frame runs round
# differently; logits of order 10 then differ in the second decimal. A bound, not a calibration: the
# GPU check prints the figures measured.
CUDA_TOLERANCE = 5e-2


def tolerance(device) -> float:
    return CUDA_TOLERANCE if torch.device(device).type == "cuda" else TOLERANCE


class StockTwin(Float32Memories, MaskHintPrompts, SAM2VideoPredictor):
    """sam2's own video predictor; its memories stay float32 off CUDA, as ours do, and it takes our
    mask hints (a method of their own over sam2's prompt path, which they enter unchanged)."""


def stock_twin(predictor) -> StockTwin:
    """The stock predictor over the same modules (weights shared, nothing copied)."""
    twin = copy.copy(predictor)
    twin.__class__ = StockTwin
    return twin


class _Images:
    """Model-input frames made on demand: stock sam2 indexes ``state["images"][t]`` one at a time."""

    def __init__(self, slices01: Sequence[torch.Tensor], image_size: int):
        self.slices01, self.image_size = list(slices01), image_size

    def __len__(self) -> int:
        return len(self.slices01)

    def __getitem__(self, t: int) -> torch.Tensor:
        return model_input(self.slices01[t][None].float(), self.image_size)[0]


def stock_state(twin: StockTwin, slices01: Sequence[torch.Tensor], height: int, width: int) -> dict:
    """sam2's ``init_state`` (run on a one-frame placeholder video), then given our frames as floats."""
    with tempfile.TemporaryDirectory(prefix="sam2fewshot_stock_") as folder:
        from PIL import Image

        Image.new("RGB", (8, 8)).save(Path(folder) / "0.jpg")
        with contextlib.redirect_stderr(io.StringIO()):  # stock tqdm bar
            state = twin.init_state(folder)
    state["images"] = _Images(slices01, twin.image_size)
    state["num_frames"] = len(slices01)
    state["video_height"], state["video_width"] = height, width
    state["cached_features"] = {}  # the placeholder frame's
    return state


def add_stock_prompts(twin: StockTwin, state: dict, prompts: Sequence[Prompt]) -> None:
    for p in sorted(prompts, key=lambda q: (q.frame, q.obj_id)):
        if p.mask is not None:
            twin.add_new_mask(state, p.frame, p.obj_id, torch.from_numpy(np.asarray(p.mask, dtype=bool)))
        elif p.mask_hint is not None:  # our extension, through sam2's own previous-logits input
            twin.add_box_with_mask_hint(state, p.frame, p.obj_id, box=p.box, points=p.points,
                                                   labels=p.point_labels, mask_hint=p.mask_hint)
        else:
            twin.add_new_points_or_box(
                state, p.frame, p.obj_id,
                points=None if p.points is None else np.asarray(p.points, dtype=np.float32),
                labels=None if p.point_labels is None else np.asarray(p.point_labels, dtype=np.int32),
                box=None if p.box is None else np.asarray(p.box, dtype=np.float32))


def stock_track(twin: StockTwin, state: dict, start: int, count: int, reverse: bool, obj_ids: Sequence[int],
           before_step: Callable[[int], None] | None = None) -> dict[int, torch.Tensor]:
    """Stock ``propagate_in_video`` over ``count`` frames from ``start``: (n_obj, H, W) logits per frame,
    objects in ``obj_ids`` order. ``before_step(t)`` runs before frame t is computed."""
    step = -1 if reverse else 1
    if before_step is not None:
        before_step(start)
    out: dict[int, torch.Tensor] = {}
    frames = twin.propagate_in_video(state, start_frame_idx=start, max_frame_num_to_track=count - 1,
                                     reverse=reverse)
    with contextlib.redirect_stderr(io.StringIO()):  # stock tqdm bar
        for t, ids, masks in frames:
            order = [list(ids).index(o) for o in obj_ids]
            out[t] = masks[order, 0].to("cpu", torch.float32)
            if before_step is not None and len(out) < count:
                before_step(t + step)
    return out


def stock_propagate(twin: StockTwin, call: PropagationCall) -> dict[int, torch.Tensor]:
    """Stock forward from the first prompt and stock reverse from the last, merged by our rule."""
    lo, hi = call.frame_range
    slices = list(call.frames.slices01)
    first, last = min(p.frame for p in call.prompts), max(p.frame for p in call.prompts)

    def one_pass(start: int, reverse: bool) -> dict[int, torch.Tensor]:
        count = start - lo + 1 if reverse else hi - start + 1
        if count <= 0:
            return {}
        state = stock_state(twin, slices, call.frames.height, call.frames.width)
        add_stock_prompts(twin, state, call.prompts)
        return stock_track(twin, state, start, count, reverse, call.obj_ids)

    fwd, bwd = one_pass(max(first, lo), False), one_pass(min(last, hi), True)
    prompted = [sorted({p.frame for p in call.prompts if p.obj_id == o}) for o in call.obj_ids]
    merged = {}
    for t in sorted(set(fwd) | set(bwd)):
        f, b = fwd.get(t), bwd.get(t)
        logits = torch.empty_like(f if f is not None else b)
        for o in range(len(call.obj_ids)):
            before = max((x for x in prompted[o] if x <= t), default=None)
            after = min((x for x in prompted[o] if x >= t), default=None)
            choice = "forward" if t in prompted[o] and f is not None else choose_pass(
                t, before, after, f is not None, b is not None)
            logits[o] = f[o] if choice == "forward" else b[o] if choice == "backward" else 0.5 * (f[o] + b[o])
        merged[t] = logits
    return merged


def stock_supports(twin: StockTwin, call: PropagationCall) -> dict[int, torch.Tensor]:
    """The stock construction of a support policy (module docstring), per query slice. Objects are
    independent in sam2 (one output dict each), so each gets its own stock video."""
    policy: SupportMemoryPolicy = call.policy
    lo, hi = call.frame_range
    if not policy.temporal:
        build = _stock_short_videos
    elif policy.placement == "before-query":
        build = _stock_supports_first
    elif policy.placement == "after-query":
        build = _stock_slots_after
    else:
        build = _stock_swapped
    per_object = [build(twin, call, o) for o in range(len(call.obj_ids))]
    return {t: torch.stack([logits[t] for logits in per_object]) for t in range(lo, hi + 1)}


def _stock_short_videos(twin: StockTwin, call: PropagationCall, o: int) -> dict[int, torch.Tensor]:
    """pair and video: for every slice, the stock video [e_k-1 .. e_0, q] tracked forward."""
    policy: SupportMemoryPolicy = call.policy
    out = {}
    for t in range(call.frame_range[0], call.frame_range[1] + 1):
        chosen = policy.chosen(o, t)[::-1]  # the best match lies next to the query slice
        state = stock_state(twin, [policy.support.images01[m] for m in chosen] + [call.frames.slices01[t]],
                            call.frames.height, call.frames.width)
        for i, m in enumerate(chosen):
            twin.add_new_mask(state, i, call.obj_ids[o], policy.support.masks[m])
        out[t] = stock_track(twin, state, 0, len(chosen) + 1, False, [call.obj_ids[o]])[len(chosen)][0]
    return out


def _stock_supports_first(twin: StockTwin, call: PropagationCall, o: int) -> dict[int, torch.Tensor]:
    """FS-MedSAM2: the support slices, then the query range, one video; masks on the supports."""
    policy: SupportMemoryPolicy = call.policy
    lo, hi = call.frame_range
    chosen = {tuple(policy.chosen(o, t)) for t in range(lo, hi + 1)}
    if len(chosen) != 1:
        raise ValueError("supports placed before the query must be the same for every slice")
    entries = list(chosen.pop())[::-1]  # the best next to the query
    k = len(entries)

    def new_state() -> dict:
        state = stock_state(twin, [policy.support.images01[m] for m in entries] + list(call.frames.slices01[lo:hi + 1]),
                            call.frames.height, call.frames.width)
        for i, m in enumerate(entries):
            twin.add_new_mask(state, i, call.obj_ids[o], policy.support.masks[m])
        return state

    tracked = _sweep(twin, new_state, None, k, k + hi - lo, policy.passes, [call.obj_ids[o]])
    return {t - k + lo: logits[0] for t, logits in tracked.items() if t >= k}


def _stock_slots_after(twin: StockTwin, call: PropagationCall, o: int) -> dict[int, torch.Tensor]:
    """FATE-SAM: the query, then k slot frames; before each slice sam2 computes, the slots take that
    slice's own supports (images and masks, added with add_new_mask and encoded by the preflight)."""
    policy: SupportMemoryPolicy = call.policy
    lo, hi = call.frame_range
    query = list(call.frames.slices01[lo:hi + 1])
    k = max(len(policy.chosen(o, t)) for t in range(lo, hi + 1))

    def new_state() -> dict:
        return stock_state(twin, query + [query[0]] * k, call.frames.height, call.frames.width)

    def condition(state: dict, t: int, reverse: bool) -> None:
        cond = state["output_dict_per_obj"][0]["cond_frame_outputs"] if state["output_dict_per_obj"] else {}
        cond.clear()
        for frame, m in policy.placed(o, t + lo, reverse).items():
            state["images"].slices01[frame - lo] = policy.support.images01[m]
            state["cached_features"] = {}
            twin.add_new_mask(state, frame - lo, call.obj_ids[o], policy.support.masks[m])
        twin.propagate_in_video_preflight(state)

    tracked = _sweep(twin, new_state, condition, 0, hi - lo, policy.passes, [call.obj_ids[o]])
    return {t + lo: logits[0] for t, logits in tracked.items()}


def _stock_swapped(twin: StockTwin, call: PropagationCall, o: int) -> dict[int, torch.Tensor]:
    """video+memory: the query followed by the support entries, every slice's own supports made its
    conditioning frames (where the policy places them) before sam2 computes it."""
    policy: SupportMemoryPolicy = call.policy
    lo, hi = call.frame_range
    n = len(call.frames)
    used = sorted({m for t in range(lo, hi + 1) for m in policy.chosen(o, t)})
    encoded: dict[int, dict] = {}

    def new_state() -> dict:
        state = stock_state(twin, list(call.frames.slices01) + list(policy.support.images01),
                            call.frames.height, call.frames.width)
        for m in used:
            twin.add_new_mask(state, n + m, call.obj_ids[o], policy.support.masks[m])
        twin.propagate_in_video_preflight(state)
        encoded.update({m: state["output_dict_per_obj"][0]["cond_frame_outputs"][n + m] for m in used})
        return state

    def condition(state: dict, t: int, reverse: bool) -> None:
        cond = state["output_dict_per_obj"][0]["cond_frame_outputs"]
        cond.clear()
        cond.update({frame: encoded[m] for frame, m in policy.placed(o, t, reverse).items()})

    return {t: logits[0] for t, logits in _sweep(twin, new_state, condition, lo, hi, policy.passes,
                                                  [call.obj_ids[o]]).items()}


def _sweep(twin: StockTwin, new_state: Callable[[], dict], condition, lo: int, hi: int, passes: str,
           obj_ids: Sequence[int]) -> dict[int, torch.Tensor]:
    """Stock tracking over frames lo..hi in a pass order of ours (propagation.py, MemoryPolicy.passes):
    each pass on a fresh state, or middle-out on one state carried from the backward to the forward
    pass. ``condition(state, t, reverse)`` sets frame t's conditioning before sam2 computes it."""

    def track(state: dict, start: int, count: int, reverse: bool) -> dict[int, torch.Tensor]:
        step = None if condition is None else (lambda t: condition(state, t, reverse))
        return stock_track(twin, state, start, count, reverse, obj_ids, before_step=step) if count > 0 else {}

    if passes == "middle-out":
        state = new_state()
        mid = lo + (hi - lo + 1) // 2
        return {**track(state, mid, mid - lo + 1, True), **track(state, mid + 1, hi - mid, False)}
    fwd = track(new_state(), lo, hi - lo + 1, False)
    if passes == "forward":
        return fwd
    bwd = track(new_state(), hi, hi - lo + 1, True)
    return {t: 0.5 * (fwd[t] + bwd[t]) for t in fwd}


@dataclass
class Comparison:
    """Our logits against stock's for one propagate() call."""

    kind: str  # prompts, or the support scheme
    tolerance: float = TOLERANCE
    slices: int = 0
    objects: int = 0
    max_abs_diff: float = 0.0
    worst_slice: int | None = None
    dice: float = 1.0  # labels from our logits against labels from stock's
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def as_json(self) -> dict:
        return {"kind": self.kind, "tolerance": self.tolerance, "slices": self.slices, "objects": self.objects,
                "max_abs_logit_diff": float(f"{self.max_abs_diff:.3g}"), "worst_slice": self.worst_slice,
                "dice": round(self.dice, 6), "equal": self.equal, "notes": self.notes}


def compare(ours: dict[int, torch.Tensor], stock: dict[int, torch.Tensor], obj_ids: Sequence[int],
            kind: str, bound: float = TOLERANCE) -> Comparison:
    if set(ours) != set(stock):
        raise AssertionError(f"{kind}: slices differ, ours {sorted(ours)} against stock {sorted(stock)}")
    result = Comparison(kind, bound, slices=len(ours), objects=len(obj_ids))
    inter = total = 0
    for t in sorted(ours):
        diff = float((ours[t] - stock[t]).abs().max())
        if diff > result.max_abs_diff or result.worst_slice is None:
            result.max_abs_diff, result.worst_slice = max(diff, result.max_abs_diff), t
        a, b = labels_from_logits(ours[t], obj_ids), labels_from_logits(stock[t], obj_ids)
        inter += int(((a == b) & (a > 0)).sum())
        total += int((a > 0).sum() + (b > 0).sum())
    result.dice = 1.0 if total == 0 else 2.0 * inter / total
    return result


def replay(call: PropagationCall) -> Comparison:
    """One call of ours replayed on the stock twin, compared slice by slice."""
    twin = stock_twin(call.predictor)
    if call.policy.max_cond_frames is not None:  # sam2's own setting, as the run had it
        twin.max_cond_frames_in_attn = int(call.policy.max_cond_frames)
    with torch.inference_mode(), model_autocast(twin):
        if isinstance(call.policy, SupportMemoryPolicy):
            policy = call.policy
            stock, kind = stock_supports(twin, call), f"supports:{policy.scheme}"
            if (policy.placement, policy.passes) != ("behind", "both"):
                kind += f" ({policy.placement}, {policy.passes})"
        elif call.prompts and type(call.policy).cond_outputs is MemoryPolicy.cond_outputs and call.policy.temporal:
            stock, kind = stock_propagate(twin, call), "prompts:" + "+".join(sorted({p.kind for p in call.prompts}))
        else:
            raise ValueError(f"no stock construction for the memory policy {type(call.policy).__name__}")
    result = compare(call.logits, stock, call.obj_ids, kind, tolerance(twin.device))
    if any(p.mask is not None for p in call.prompts):
        result.notes.append("mask-prompted slices: model output compared; the user's mask is returned")
    if any(p.mask_hint is not None for p in call.prompts):
        result.notes.append("mask hints enter through sam2's previous-logits input (our extension)")
    return result


@contextlib.contextmanager
def checked_against_stock() -> Iterator[list[Comparison]]:
    """Every propagate() call in the block, replayed on stock sam2 as it returns."""
    found: list[Comparison] = []
    with watched(lambda call: found.append(replay(call))):
        yield found


def check_variants(cases: dict, methods: Sequence, runner, settings, progress=None) -> list[dict]:
    """Every SAM2 variant on the plan's queries through the runner, each of its propagate() calls
    replayed on stock sam2: one row per (query, variant)."""
    from .leave_one_out import query_cases

    rows = []
    for case in query_cases(cases, settings):
        query_name = case.name
        for method in (m for m in methods if m.needs_model):
            if progress:
                progress.start(query_name, method.name)
            row = {"case": query_name, "method": method.name}
            try:
                runner.forget_supports()
                with checked_against_stock() as found:
                    runner.run(case.request(method, settings), progress)
                row.update({"calls": [c.as_json() for c in found],
                            "max_abs_logit_diff": max(c.max_abs_diff for c in found),
                            "dice": min(c.dice for c in found), "equal": all(c.equal for c in found)})
            except Exception as exc:  # one failed variant must not hide the others
                row.update({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                            "equal": False})
            rows.append(row)
            if progress:
                progress.advance()
        runner.forget_sessions()
    return rows


def equivalence_markdown(rows: list[dict]) -> list[str]:
    lines = ["## Equivalence with stock sam2", "",
             f"Each propagate() call replayed on sam2's own video predictor with the same weights and conditioning "
             f"(bench/equivalence.py); equal means a max logit difference of at most {TOLERANCE:g} (float32), "
             f"{CUDA_TOLERANCE:g} under CUDA bfloat16 autocast.", "",
             "| query | method | calls | max abs logit diff | Dice ours vs stock | equal |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['method']} | - | - | - | failed: {r['error']} |")
            continue
        kinds = ", ".join(c["kind"] for c in r["calls"])
        lines.append(f"| {r['case']} | {r['method']} | {kinds} | {r['max_abs_logit_diff']:.3g} | {r['dice']:.4f} | "
                     f"{'yes' if r['equal'] else '**no**'} |")
    return lines
