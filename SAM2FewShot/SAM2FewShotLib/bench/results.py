"""The benchmark's outputs: results.json, a Markdown table and PNG plots, all in one folder."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..common.files import replacing, write_json_atomic
from .metrics import summarize

log = logging.getLogger(__name__)
METRICS = (("dice", "Dice"), ("hd95_mm", "HD95 (mm)"), ("nsd", "NSD"))


def summarize_runs(runs: list[dict]) -> dict:
    """Per method: mean and sd of every metric per structure, time and peak memory."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        ok = [r for r in mine if r["status"] == "ok"]
        structures = dict.fromkeys(name for r in ok for name in r["structures"])
        out[method] = {
            "runs": len(mine), "failed": len(mine) - len(ok),
            "uses_query_truth": any(r["uses_query_truth"] for r in mine),
            "structures": {name: {key: summarize(_hd(r["structures"][name], key) for r in ok
                                                 if name in r["structures"]).as_json()
                                  for key, _ in METRICS} for name in structures},
            "per_slice_s": summarize(r["per_slice_s"] for r in ok).as_json(),
            "total_s": summarize(r["total_s"] for r in ok).as_json(),
            "method_s": summarize(r["method_s"] for r in ok).as_json(),
            "encode_s": summarize(r["encode_s"] for r in ok).as_json(),
            "peak_rss_mb": _max(r["memory"]["peak_rss_mb"] for r in ok),
            "peak_rss_above_start_mb": _max(r["memory"]["peak_rss_above_start_mb"] for r in ok),
            "peak_gpu_mb": _max(r["memory"]["peak_gpu_mb"] for r in ok),
        }
    return out


def _hd(entry: dict, key: str) -> float | None:
    """JSON keeps a missing HD95 as null with 'empty' saying why: back to inf for the summary."""
    value = entry[key]
    if key == "hd95_mm" and value is None and entry.get("empty") in ("result", "truth"):
        return math.inf
    return value


def _max(values) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _fmt(s: dict, digits: int = 3) -> str:
    if s["mean"] is None:
        return "n/a" if not s.get("n_inf") else f"inf ×{s['n_inf']}"
    text = f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"
    return text + (f" (+{s['n_inf']} inf)" if s.get("n_inf") else "")


def _num(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(results: dict) -> str:
    """The human-readable report: accuracy and speed tables, peer comparison, memory scaling."""
    lines = ["# sam2fewshot bench", ""]
    model, machine = results.get("model") or {}, results["machine"]
    if model:
        lines.append(f"Model: {model.get('name')} ({model.get('weights')}), image size {model.get('image_size')}, "
                     f"device {model.get('device')}.")
    lines.append(f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
                 f"({machine['torch_threads']} threads), load average at start {machine['load_average']}. "
                 "Timings on a shared machine vary with its load.")
    if model and "random" in str(model.get("weights")):
        lines.append("**Random weights: the accuracy figures are meaningless; time and memory are real.**")
    lines.append("")
    summary = results.get("summary") or {}
    if summary:
        lines += _accuracy_table(results, summary) + [""] + _speed_table(summary) + [""]
        failed = [r for r in results["runs"] if r["status"] != "ok"]
        for r in failed:
            lines.append(f"- failed: {r['case']} {r['method']}: {r['error']}")
        if failed:
            lines.append("")
    if results.get("equivalence"):
        from .equivalence import equivalence_markdown

        lines += equivalence_markdown(results["equivalence"]) + [""]
    if results.get("peer_speed"):
        lines += _peer_section(results["peer_speed"]) + [""]
    if results.get("memory_scaling"):
        lines += _memory_section(results["memory_scaling"]) + [""]
    return "\n".join(lines)


def _accuracy_table(results: dict, summary: dict) -> list[str]:
    tol = results["settings"]["tolerance_mm"]
    lines = [f"## Accuracy (mean ± sd over {len(results['cases'])} queries, leave-one-out)", "",
             f"| method | structure | Dice | HD95 (mm) | NSD @ {tol:g} mm | n |", "|---|---|---|---|---|---|"]
    for method, s in summary.items():
        label = method + (" *" if s["uses_query_truth"] else "")
        for name, m in s["structures"].items():
            n = m["dice"]["n"]
            lines.append(f"| {label} | {name} | {_fmt(m['dice'])} | {_fmt(m['hd95_mm'], 2)} | {_fmt(m['nsd'])} | {n} |")
    if any(s["uses_query_truth"] for s in summary.values()):
        lines += ["", "\\* reads the query's ground truth (a mask on each structure's largest slice): "
                  "the interactive upper bound, not a few-shot result."]
    return lines


def _speed_table(summary: dict) -> list[str]:
    lines = ["## Time and memory", "",
             "| method | s / slice (end to end) | s / case | of which encoding (shared) | peak RSS (MB) "
             "| peak RSS above start (MB) | peak GPU (MB) | failed |", "|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| {method} | {_fmt(s['per_slice_s'])} | {_fmt(s['total_s'], 1)} | {_fmt(s['encode_s'], 1)} "
                     f"| {_num(s['peak_rss_mb'])} | {_num(s['peak_rss_above_start_mb'])} | {_num(s['peak_gpu_mb'])} "
                     f"| {s['failed']}/{s['runs']} |")
    lines += ["", "A query's frames are encoded once and the model methods share them (the worker keeps "
              "sessions warm); end-to-end time counts that encoding in every method. Each method encodes its "
              "own support slices (within its s / case), whatever ran before it."]
    return lines


def _peer_section(p: dict) -> list[str]:
    ours, ref = p["ours"], p["reference"]
    return [
        f"## Against a peer-style pipeline ({p['slices']} slices {p['slice_shape'][0]}×{p['slice_shape'][1]}, "
        f"{p['structures']} structures, image size {p['image_size']}, {p['device']})", "",
        "| pipeline | wall (s) | CPU (s) | s / slice | model forwards (s) | outside the model |",
        "|---|---|---|---|---|---|",
        f"| this engine (in memory) | {ours['wall_s']:.2f} | {ours['cpu_s']:.2f} | {ours['per_slice_s']:.3f} "
        f"| {ours['model_s']:.2f} | {100 * ours['outside_model_share']:.1f} % |",
        f"| JPEG folder + stock init_state, forward only | {ref['wall_s']:.2f} | {ref['cpu_s']:.2f} "
        f"| {ref['per_slice_s']:.3f} | {ref['model_s']:.2f} | {100 * ref['outside_model_share']:.1f} % "
        f"(JPEG write {ref['jpeg_write_s']:.2f} s, init_state {ref['init_state_s']:.2f} s) |",
        "", f"Wall-time ratio reference / ours: **{p['ratio_reference_over_ours']}** "
        f"(CPU time: {p['cpu_ratio_reference_over_ours']}). Same weights, same frames, masks on slice 0; "
        f"label agreement between the two (Dice): {p['agreement_dice']}.",
    ]


def _memory_section(m: dict) -> list[str]:
    lines = ["## Peak memory against slice count (propagate from the middle slice)", "",
             "| slices | frames (MB) | peak above start (MB) | above the frames (MB) | encoder features in memory (MB) "
             "| features on disk (MB) | outputs (MB) | rest (MB) | held at the end (MB) | s / slice |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in m["points"]:
        lines.append(f"| {p['slices']} | {p['frames_mb']} | {p['peak_rss_above_start_mb']} | {p['above_frames_mb']} "
                     f"| {p['features_held_mb']} | {p.get('features_on_disk_mb', 0)} | {p['outputs_mb']} "
                     f"| {p['rest_mb']} | {p['live_at_end_mb']} "
                     f"| {p['per_slice_s']} |")
    slopes = m.get("per_slice_mb", {})
    budget = m.get("feature_budget_mb")
    lines += ["", "Growth per extra slice (least squares, MB): " +
              ", ".join(f"{k} {v:.3f}" for k, v in slopes.items() if v is not None) + ".",
              "Encoder features kept in memory: " + (f"{budget:g} MB" if budget else "the session's default") +
              " at most; the rest are offloaded to a scratch file on disk." +
              (f" glibc M_MMAP_THRESHOLD fixed at {m['mmap_threshold']} bytes." if m.get("mmap_threshold") else ""),
              "Each count runs in a fresh process. Outputs: the result label map, one byte per voxel, which "
              "propagation writes straight into. Rest: the "
              "peak that frames, features and outputs do not explain (transient activations, allocator slack). "
              "Held at the end: resident memory after freeing what the allocator kept, session and result alive."]
    return lines


def plot_all(results: dict, out_dir: Path) -> list[Path]:
    """PNG plots (matplotlib, Agg): Dice per structure and method, time per slice, scaling, peer."""
    return write_plots((("dice.png", _plot_dice), ("time_per_slice.png", _plot_time),
                        ("memory_scaling.png", _plot_memory), ("peer_speed.png", _plot_peer)), results, out_dir)


def write_plots(drawings, data, out_dir: Path) -> list[Path]:
    """Each (file name, draw(plt, data) -> figure or None) as a PNG in ``out_dir``, atomically; none
    without matplotlib (an optional extra), which a warning says."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'sam2fewshot[plot]'): no plots")
        return []
    paths = []
    for name, draw in drawings:
        fig = draw(plt, data)
        if fig is not None:
            fig.tight_layout()
            try:
                with replacing(out_dir / name) as tmp:
                    fig.savefig(tmp, dpi=110, format="png")
            finally:
                plt.close(fig)
            paths.append(out_dir / name)
    return paths


def _plot_dice(plt, results: dict):
    import numpy as np

    summary = results.get("summary") or {}
    if not summary:
        return None
    methods = list(summary)
    structures = list(dict.fromkeys(n for s in summary.values() for n in s["structures"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(structures) * max(1, len(methods)) / 3), 4))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(structures))
    for i, method in enumerate(methods):
        pos = x - 0.4 + width * (i + 0.5)
        stats = [summary[method]["structures"].get(n, {}).get("dice") or {"mean": None} for n in structures]
        means = [s["mean"] or 0.0 for s in stats]
        sds = [s.get("sd") or 0.0 for s in stats]
        ax.bar(pos, means, width, yerr=sds, capsize=2, label=method)
        for j, n in enumerate(structures):  # every query's own score
            vals = [r["structures"][n]["dice"] for r in results["runs"]
                    if r["method"] == method and r["status"] == "ok" and n in r["structures"]]
            ax.scatter([pos[j]] * len(vals), vals, s=8, color="k", zorder=3)
    ax.set_xticks(x, structures)
    ax.set_ylim(0, 1)
    ax.set_ylabel("3D Dice")
    ax.set_title("Dice per structure and method")
    ax.legend(fontsize=7)
    return fig


def _plot_time(plt, results: dict):
    summary = results.get("summary") or {}
    if not summary:
        return None
    methods = list(summary)
    per_slice = [summary[m]["per_slice_s"]["mean"] or 0.0 for m in methods]
    encode = [_mean([r["encode_s"] / r["num_slices"] for r in results["runs"]
                     if r["method"] == m and r["status"] == "ok"]) for m in methods]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(methods)), 4))
    ax.bar(methods, encode, label="encoding the query (shared)")
    ax.bar(methods, [p - e for p, e in zip(per_slice, encode, strict=True)], bottom=encode, label="method")
    ax.set_ylabel("seconds per slice")
    ax.set_title("Time per slice (end to end)")
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    ax.legend(fontsize=7)
    return fig


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _plot_memory(plt, results: dict):
    m = results.get("memory_scaling")
    if not m:
        return None
    pts = m["points"]
    xs = [p["slices"] for p in pts]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label, style in (("peak_rss_above_start_mb", "peak above start", "-"), ("frames_mb", "frames", "-"),
                              ("above_frames_mb", "peak above the frames", "-"),
                              ("features_held_mb", "encoder features in memory", "-"),
                              ("features_on_disk_mb", "encoder features on disk (not memory)", ":"),
                              ("live_at_end_mb", "held at the end", "-")):
        if all(key in p for p in pts):
            ax.plot(xs, [p[key] for p in pts], style, marker="o", label=label)
    ax.set_xlabel("slices")
    ax.set_ylabel("MB")
    ax.set_title("Peak memory against slice count")
    ax.legend(fontsize=7)
    return fig


def _plot_peer(plt, results: dict):
    p = results.get("peer_speed")
    if not p:
        return None
    names = ["this engine", "JPEG + stock sam2"]
    model = [p["ours"]["model_s"], p["reference"]["model_s"]]
    outside = [p["ours"]["outside_model_s"], p["reference"]["outside_model_s"]]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(names, model, label="model forwards")
    ax.bar(names, outside, bottom=model, label="outside the model")
    ax.set_ylabel("seconds")
    ax.set_title(f"{p['slices']} slices, image size {p['image_size']}")
    ax.legend(fontsize=7)
    return fig


def finite_json(value):
    """JSON has no NaN or inf: they become null (the records say why where it matters)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_results(results: dict, out_dir: Path) -> list[Path]:
    """results.json, results.md and the plots; each file appears whole or not at all."""
    out_dir = Path(out_dir)
    results = finite_json(results)
    plots = plot_all(results, out_dir)
    md = out_dir / "results.md"
    with replacing(md) as tmp:
        tmp.write_text(markdown(results) + "\n")
    write_json_atomic(results, out_dir / "results.json")
    return [out_dir / "results.json", md, *plots]
