"""Where a run's time goes: per model part and per op kind, the time, the FLOPs and the rate achieved,
beside the machine's own matmul rate (issue 16: "fast enough without an NVIDIA GPU").

Three runs of each request on a cold session (nothing encoded): the first under FlopCounterMode
counts the FLOPs of every aten op per model part, the second prepares oneDNN's kernels (they are
made per shape on first use: a 256 px run took twice as long cold), the third under torch.profiler
times them. The parts are sam2's own submodules, marked by forward hooks as
profiler ranges; the rest (our code, sam2's glue between the parts, file reading) is the total
wall time less the parts. An op's kind is that of the outermost aten op it runs in, so the copies
inside a linear layer count as matmul; the time inside a part that no op accounts for is Python.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..common.errors import InputError
from ..common.names import file_name
from ..io.slicing import slicing_axis
from ..io.volume import LabelMap, Volume
from ..io.volume_io import read_labels, read_volume, write_labels, write_volume
from ..run.request import FrameOptions, Request
from ..sam2.build import ModelOptions

# model part -> the predictor's submodules it is made of
PARTS = {"image encoder": ("image_encoder",), "memory attention": ("memory_attention",),
         "memory encoder": ("memory_encoder",), "mask decoder": ("sam_mask_decoder", "sam_prompt_encoder")}
REST = "rest (our code, sam2 glue)"
MATMUL, ATTENTION, ELEMENTWISE, COPIES, PYTHON = ("matmul/conv", "attention", "elementwise/norm", "copies/dtype",
                                                  "python")
KINDS = (MATMUL, ATTENTION, ELEMENTWISE, COPIES, PYTHON)
RANGE_PREFIX = "sam2fewshot::"

_MATMUL_OPS = {"linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "addbmm", "einsum", "conv1d", "conv2d",
               "conv3d", "convolution", "_convolution", "conv_transpose2d", "mkldnn_convolution", "_addmm_activation"}
_ATTENTION_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "softmax", "_softmax", "_safe_softmax"}
_COPY_OPS = {"to", "_to_copy", "copy_", "contiguous", "clone", "cat", "stack", "repeat", "index", "index_select",
             "reshape", "flatten", "view", "permute", "transpose", "expand", "slice", "select", "unsqueeze",
             "squeeze", "as_strided", "t", "empty", "empty_like", "zeros", "zeros_like", "lift_fresh", "detach",
             "pad", "constant_pad_nd", "roll", "unbind", "split", "chunk", "narrow", "type_as", "movedim",
             "_unsafe_view", "empty_strided", "resize_", "fill_", "new_zeros", "new_empty"}


def op_kind(name: str) -> str:
    """The kind of an aten op by its name ("aten::linear", "aten.mm.default", "aten._to_copy")."""
    base = name.split("::")[-1].split(".")[-1] if "::" in name else name.split(".")[1] if "." in name else name
    if base in _ATTENTION_OPS:
        return ATTENTION
    if base in _MATMUL_OPS:
        return MATMUL
    if base in _COPY_OPS:
        return COPIES
    return ELEMENTWISE


# --- marking the parts ------------------------------------------------------------------------------------


@contextmanager
def part_ranges(predictor) -> Iterator[None]:
    """Every forward of a model part runs inside a profiler range named after the part."""
    handles, open_ranges = [], []
    for part, attrs in PARTS.items():
        for attr in attrs:
            module = getattr(predictor, attr)

            def enter(_module, _inputs, part=part):
                rf = torch.autograd.profiler.record_function(RANGE_PREFIX + part)
                rf.__enter__()
                open_ranges.append(rf)

            def leave(_module, _inputs, _output):
                open_ranges.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attribute_times(events, total_s: float) -> dict[str, dict[str, float]]:
    """Seconds per part and op kind from profiler events: each outermost op goes to the part whose
    range holds it; a part's time no op accounts for is Python; the rest is ``total_s`` less the parts."""
    times: dict[str, dict[str, float]] = {p: dict.fromkeys(KINDS, 0.0) for p in list(PARTS) + [REST]}
    ranges = [e for e in events if e.name.startswith(RANGE_PREFIX)]
    main = ranges[0].thread if ranges else None
    span = {p: 0.0 for p in PARTS}
    for e in events:
        if main is not None and e.thread != main:
            continue
        seconds = (e.time_range.end - e.time_range.start) / 1e6
        if e.name.startswith(RANGE_PREFIX):
            span[e.name[len(RANGE_PREFIX):]] += seconds
            continue
        parent = e.cpu_parent
        if parent is not None and not parent.name.startswith(RANGE_PREFIX):
            continue  # inside another op: counted with it
        part = parent.name[len(RANGE_PREFIX):] if parent is not None else REST
        times[part][op_kind(e.name)] += seconds
    for part in PARTS:
        times[part][PYTHON] = span[part] - sum(times[part][k] for k in KINDS if k != PYTHON)
    rest = max(total_s - sum(span.values()), 0.0)
    times[REST][PYTHON] = rest - sum(times[REST][k] for k in KINDS if k != PYTHON)
    return times


# --- counting FLOPs -----------------------------------------------------------------------------------------


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode knows the CUDA attention kernels; this is the CPU one's (same formula)."""
    from torch.utils.flop_counter import sdpa_flop_count

    def four(s):
        return (1,) * (4 - len(s)) + tuple(s)

    return sdpa_flop_count(four(query_shape), four(key_shape), four(value_shape))


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], object], predictor) -> tuple[dict[str, dict[str, int]], object]:
    """(FLOPs per part and op kind, fn's result): fn run under FlopCounterMode, which keys its counts
    by the class name of each module first called on its own (our parts are)."""
    counter = flop_counter()
    with counter:
        result = fn()
    counts = counter.get_flop_counts()
    flops: dict[str, dict[str, int]] = {p: dict.fromkeys(KINDS, 0) for p in list(PARTS) + [REST]}
    for part, attrs in PARTS.items():
        for attr in attrs:
            for op, n in counts.get(type(getattr(predictor, attr)).__name__, {}).items():
                flops[part][op_kind(str(op))] += int(n)
    for op, n in counts.get("Global", {}).items():
        flops[REST][op_kind(str(op))] += int(n)
    for part in PARTS:
        for kind in KINDS:
            flops[REST][kind] -= flops[part][kind]
    return flops, result


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` at torch's current thread count (the best of reps)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = np.inf
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


# --- inputs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileInputs:
    """A query window with a mask prompt on one slice, and a support case: files in a scratch folder."""

    name: str
    query: str
    prompt_labels: str
    support: tuple[str, str]
    slices: int


def crop_slices(volume: Volume, axis: int, first: int, count: int) -> Volume:
    """Slices first..first+count-1 along array axis ``axis``, with the origin moved to keep the geometry."""
    index = [slice(None)] * 3
    index[axis] = slice(first, first + count)
    offset = np.zeros(3)
    offset[2 - axis] = first  # array axes are (k, j, i)
    origin = np.asarray(volume.origin) + volume.direction_matrix @ (np.asarray(volume.spacing) * offset)
    return Volume(np.ascontiguousarray(volume.array[tuple(index)]), volume.spacing, tuple(origin), volume.direction)


def window(labels: np.ndarray, axis: int, count: int | None) -> tuple[int, int]:
    """(first, count): ``count`` slices centred on the one with the most labelled voxels (all for None/0)."""
    n = labels.shape[axis]
    if not count or count >= n:
        return 0, n
    areas = np.moveaxis(labels, axis, 0).reshape(n, -1).astype(bool).sum(axis=1)
    first = int(np.clip(int(np.argmax(areas)) - count // 2, 0, n - count))
    return first, int(count)


def case_inputs(folder: Path, name: str, image: Path, labels: Path, support: tuple[Path, Path],
                slices: int | None) -> ProfileInputs:
    """A labelled case as profile inputs: a slice window of it, each structure's mask on its largest slice."""
    from .leave_one_out import truth_prompt_labels

    volume = read_volume(image)
    truth = read_labels(labels, reference=volume)
    axis = slicing_axis(volume, "auto")
    first, count = window(truth.volume.array, axis, slices)
    query = crop_slices(volume, axis, first, count)
    cropped = LabelMap(crop_slices(truth.volume, axis, first, count), truth.segments)
    if not cropped.volume.array.any():
        raise InputError(f"{name} has no labelled voxel in its slices {first}..{first + count - 1}")
    paths = [folder / f"{file_name(name)}_{part}.nrrd" for part in ("query", "prompt")]  # a case name, not a path
    write_volume(query, paths[0])
    write_labels(truth_prompt_labels(cropped, axis), paths[1])
    return ProfileInputs(name, str(paths[0]), str(paths[1]), (str(support[0]), str(support[1])), count)


def synthetic_inputs(folder: Path, slices: int | None, size: int, structures: int, seed: int) -> ProfileInputs:
    """A synthetic query and support (bench/synthetic.py), written as files."""
    from .synthetic import synthetic_case

    n = slices or 8
    files = []
    for role, s in (("support", seed + 1), ("case", seed)):
        image, labels = synthetic_case(n, size, structures, seed=s)
        files.append((write_volume(image, folder / f"synthetic_{role}_img.nrrd"),
                      write_labels(labels, folder / f"synthetic_{role}_seg.nrrd")))
    return case_inputs(folder, "synthetic", files[1][0], files[1][1], files[0], None)


def data_inputs(folder: Path, data: Path | None, slices: int | None, size: int, structures: int, seed: int,
                support: str | None = None, max_cases: int | None = 1) -> list[ProfileInputs]:
    """Profile inputs from the first cases of ``data`` (the next case, or ``support``, as their support),
    or one synthetic case without data."""
    from .leave_one_out import bench_cases

    if data is None:
        return [synthetic_inputs(folder, slices, size, structures, seed)]
    cases = bench_cases(data)
    names = list(cases)
    if len(names) < 2 and support is None:
        raise InputError(f"{data} has one labelled case: the matched-support run needs a second as its support")
    if support is not None and support not in cases:
        raise InputError(f"support case '{support}' is not in {data} (cases: {', '.join(names)})")
    out = []
    for n, name in enumerate(names[: max_cases or len(names)]):
        other = support if support is not None and support != name else names[(n + 1) % len(names)]
        out.append(case_inputs(folder, name, *cases[name], cases[other], slices))
    return out


def requests(inputs: ProfileInputs, model: ModelOptions, frames: FrameOptions, fewshot: dict) -> dict[str, Request]:
    """The propagation and the matched-support run of the profile."""
    return {"propagate": Request("propagate", inputs.query, prompt_labels=inputs.prompt_labels, model=model,
                                 frames=frames),
            "matched-support": Request("matched-support", inputs.query, supports=(inputs.support,), model=model,
                                       frames=frames, params=dict(fewshot))}


# --- the profile ----------------------------------------------------------------------------------------------


def _cold(runner) -> None:
    runner.forget_sessions()
    runner.forget_supports()


def profile_request(runner, request: Request) -> dict:
    """FLOPs, then (after a plain warm-up run) times, of one request on a cold session."""
    predictor, _ = runner.model(request.model)
    _cold(runner)
    flops, (labels, report) = count_flops(lambda: runner.run(request), predictor)
    _cold(runner)
    runner.run(request)  # warm-up: under FlopCounterMode composite ops ran decomposed, other kernels
    _cold(runner)
    with part_ranges(predictor), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        labels, report = runner.run(request)
        total = time.perf_counter() - start
    times = attribute_times(prof.events(), total)
    _cold(runner)
    slices = int(report["timing"].get("slices_run") or labels.volume.array.shape[0])
    parts = {p: {"time_s": sum(times[p].values()), "flops": sum(flops[p].values()),
                 "kinds": {k: {"time_s": times[p][k], "flops": flops[p][k]} for k in KINDS}}
             for p in times}
    return {"total_s": total, "slices": slices, "s_per_slice": total / max(slices, 1),
            "frames_encoded": int(report["timing"]["frames_encoded"]), "parts": parts,
            "flops": sum(p["flops"] for p in parts.values())}


def run_profile(runner, inputs: ProfileInputs, model: ModelOptions, frames: FrameOptions, fewshot: dict,
                say: Callable[[str], None] = print) -> dict:
    """The profile of a propagation and a matched-support run, and the matmul peak beside it."""
    predictor, info = runner.model(model)
    dtype = torch.bfloat16 if getattr(predictor, "precision", None) == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    out = {"case": inputs.name, "slices": inputs.slices, "model": info, "threads": torch.get_num_threads(),
           "matmul_peak_dtype": str(dtype).replace("torch.", ""), "runs": {}}
    for method, request in requests(inputs, model, frames, fewshot).items():
        say(f"profiling {method} on {inputs.name} ({inputs.slices} slices) ...")
        out["runs"][method] = profile_request(runner, request)
    # before and after: on a machine others share, the better of the two is nearer the machine's own
    out["matmul_peak_gflops"] = max(peak, matmul_peak(dtype))
    out["load_average"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return out


def _rate(flops: float, seconds: float) -> str:
    return f"{flops / seconds / 1e9:.1f}" if seconds > 0 and flops > 0 else "-"


def markdown(profile: dict) -> str:
    """The profile as markdown tables: per part (with its time per op kind), then per op kind."""
    m = profile["model"]
    lines = [f"## Profile: {profile['case']}, {profile['slices']} slices, {m.get('image_size')} px, "
             f"{m.get('precision')}, {profile['threads']} threads (load average {profile['load_average']})",
             f"matmul peak (2048x2048, {profile['matmul_peak_dtype']}): {profile['matmul_peak_gflops']:.1f} GFLOP/s"]
    for method, run in profile["runs"].items():
        lines += ["", f"### {method}: {run['total_s']:.2f} s, {run['s_per_slice']:.3f} s/slice, "
                      f"{run['flops'] / 1e9:.1f} GFLOP ({_rate(run['flops'], run['total_s'])} GFLOP/s), "
                      f"{run['frames_encoded']} frames encoded", "",
                  "| part | time s | share | GFLOP | GFLOP/s | " + " | ".join(f"{k} s" for k in KINDS) + " |",
                  "|---" * (5 + len(KINDS)) + "|"]
        for part, p in run["parts"].items():
            kinds = " | ".join(f"{p['kinds'][k]['time_s']:.3f}" for k in KINDS)
            lines.append(f"| {part} | {p['time_s']:.3f} | {p['time_s'] / run['total_s']:.0%} | "
                         f"{p['flops'] / 1e9:.2f} | {_rate(p['flops'], p['time_s'])} | {kinds} |")
        lines += ["", "| op kind | time s | share | GFLOP | GFLOP/s |", "|---|---|---|---|---|"]
        for k in KINDS:
            t = sum(p["kinds"][k]["time_s"] for p in run["parts"].values())
            f = sum(p["kinds"][k]["flops"] for p in run["parts"].values())
            lines.append(f"| {k} | {t:.3f} | {t / run['total_s']:.0%} | {f / 1e9:.2f} | {_rate(f, t)} |")
    return "\n".join(lines)


def scratch_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="sam2fewshot-profile-")
