"""bfloat16 against float32 on the same inputs and weights: how far the logits move, how much the label
maps still agree per structure, and the time per slice both ways (issue 16, item 3).

The same propagation (a mask prompt on each structure's largest slice) runs on two models built
alike but for their precision; the logits are the merged per-slice logits the propagation decides
(sam2/propagation.watched), before a mask prompt replaces its own slice.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from ..io.volume import LabelMap
from ..run.request import FrameOptions, Request
from ..sam2.build import ModelOptions
from .metrics import dice
from .profile import ProfileInputs


def logged_run(runner, request: Request) -> tuple[LabelMap, dict, dict, float]:
    """(labels, logits per slice, report, wall seconds) of one run on a cold session."""
    from ..sam2.propagation import watched

    runner.forget_sessions()
    logits: dict[int, torch.Tensor] = {}

    def keep(call) -> None:
        logits.update({t: v.float() for t, v in call.logits.items()})

    start = time.perf_counter()
    with watched(keep):
        labels, report = runner.run(request)
    return labels, logits, report, time.perf_counter() - start


def compare_case(runners: dict, inputs: ProfileInputs, model: ModelOptions, frames: FrameOptions,
                 warm_up: bool = False) -> dict:
    """fp32 against bf16 on one case: max |logit difference|, Dice per structure, s/slice both ways.
    ``warm_up``: run each once untimed first (oneDNN prepares its kernels per shape on first use,
    which took longer than the runs themselves at 256 px)."""
    runs = {}
    for precision, runner in runners.items():
        options = dataclasses.replace(model, precision=precision)
        request = Request("propagate", inputs.query, prompt_labels=inputs.prompt_labels, model=options, frames=frames)
        if warm_up:
            logged_run(runner, request)
        runs[precision] = logged_run(runner, request)
    (l32, g32, r32, s32), (l16, g16, r16, s16) = runs["fp32"], runs["bf16"]
    l32, l16 = l32.volume.array, l16.volume.array
    common = sorted(set(g32) & set(g16))
    diff = max((float((g32[t] - g16[t]).abs().max()) for t in common), default=0.0)
    # random weights give logits near 0 almost everywhere: a small difference flips many voxels
    scale = float(torch.cat([g32[t].flatten() for t in common]).abs().median()) if common else 0.0
    structures = {s["name"]: dice(l32 == s["value"], l16 == s["value"]) for s in r32["segments"]}
    slices = int(r32["timing"]["slices_run"])
    return {"case": inputs.name, "slices": slices, "max_abs_logit_diff": diff, "median_abs_logit_fp32": scale,
            "dice": structures, "s_per_slice": {"fp32": s32 / slices, "bf16": s16 / slices},
            "precision_ran": {"fp32": r32["model"].get("precision"), "bf16": r16["model"].get("precision")}}


def precision_check(cases: list[ProfileInputs], model: ModelOptions, frames: FrameOptions,
                    say: Callable[[str], None] = print) -> dict:
    """compare_case on every case, with one warm model per precision."""
    from ..run.runner import Runner

    runners = {"fp32": Runner(save_support_features=False), "bf16": Runner(save_support_features=False)}
    out = []
    try:
        for inputs in cases:
            say(f"fp32 against bf16 on {inputs.name} ({inputs.slices} slices) ...")
            out.append(compare_case(runners, inputs, model, frames, warm_up=not out))
    finally:
        for runner in runners.values():
            runner.forget()
    per = {p: sum(c["s_per_slice"][p] * c["slices"] for c in out) / max(1, sum(c["slices"] for c in out))
           for p in ("fp32", "bf16")}
    return {"cases": out, "threads": torch.get_num_threads(), "image_size": model.image_size,
            "s_per_slice": per, "min_dice": min((d for c in out for d in c["dice"].values()), default=None)}


def markdown(check: dict) -> str:
    lines = [f"## bf16 against fp32: {check['image_size']} px, {check['threads']} threads", "",
             "| case | slices | max abs logit diff | median abs fp32 logit | Dice per structure | s/slice fp32 | "
             "s/slice bf16 |", "|---|---|---|---|---|---|---|"]
    for c in check["cases"]:
        d = ", ".join(f"{k} {v:.3f}" for k, v in c["dice"].items())
        lines.append(f"| {c['case']} | {c['slices']} | {c['max_abs_logit_diff']:.3g} | "
                     f"{c['median_abs_logit_fp32']:.3g} | "
                     f"{d} | {c['s_per_slice']['fp32']:.3f} | {c['s_per_slice']['bf16']:.3f} |")
    per = check["s_per_slice"]
    lines += ["", f"all cases: {per['fp32']:.3f} s/slice fp32, {per['bf16']:.3f} s/slice bf16 "
                  f"({per['fp32'] / per['bf16']:.2f}x); lowest Dice {check['min_dice']:.3f}"]
    return "\n".join(lines)
