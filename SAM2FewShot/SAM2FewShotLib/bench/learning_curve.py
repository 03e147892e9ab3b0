"""Learning curve: how a method's Dice grows as the labelled set grows, one accepted case at a time.

Reviewing a cohort adds cases to the labelled set (`library add`); this says whether that pays and by
how much. For each query case, K random orders of the other cases (seeded: ``seed`` and the query's
place in the plan, so a shorter plan keeps the others' orders) and, for k = 1 .. N-1, the first k cases
of each order are the labelled set: the supports of registration and matched support, the library of
retrieval. Each run goes through the bench's own machinery (leave_one_out: one Request, the one
Runner, scored by metrics.score_labels). A run depends only on the set: its supports are passed in name
order, so a set that comes up again (the full set, in every order) is run once and counted in each
order it belongs to. Means and sample standard deviations are over queries and orders.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..common.errors import InputError
from ..common.files import replacing, write_json_atomic
from ..methods.registry import PROMPTS, get_method
from .leave_one_out import BenchProgress, BenchSettings, BenchVariant, CasePaths, _encode_query, _run_one, query_cases
from .metrics import summarize
from .results import _fmt, finite_json, write_plots

OVERALL = "overall"  # a run's mean Dice over its structures
CSV_NAME, RUNS_CSV, JSON_NAME, PLOT_NAME = ("learning_curve.csv", "learning_curve_runs.csv", "learning_curve.json",
                                            "learning_curve.png")


def support_orders(pool: Sequence[str], orders: int, seed: int, query_index: int) -> list[list[str]]:
    """``orders`` random orders of ``pool``, the same for a given (seed, query) whatever else runs."""
    rng = np.random.default_rng([seed, query_index])
    return [[pool[i] for i in rng.permutation(len(pool))] for _ in range(orders)]


def check_curve(methods: Sequence[BenchVariant], orders: int, settings: BenchSettings) -> None:
    """Refuse, before any work, what has no learning curve: no method, a variant the labelled set does not
    feed (propagate is prompted from the query's own truth), a fixed support, no order."""
    if not methods:
        raise InputError("--learning-curve needs --method M (e.g. registration)")
    for method in methods:
        if get_method(method.method).inputs == PROMPTS:
            raise InputError(f"{method.name} is prompted from the query's own ground truth, not from the labelled "
                             "set: it has no learning curve")
    if settings.support is not None:
        raise InputError("the learning curve grows the labelled set from the other cases: leave out --support")
    if orders < 1:
        raise InputError(f"--orders must be at least 1, got {orders}")


def run_learning_curve(cases: dict[str, CasePaths], methods: Sequence[BenchVariant], runner, settings: BenchSettings,
                       orders: int = 3, seed: int = 0, progress: BenchProgress | None = None) -> list[dict]:
    """One record per (method, query, order, k): the supports, Dice per structure, time, or the error."""
    check_curve(methods, orders, settings)
    records = []
    for n, case in enumerate(query_cases(cases, settings)):
        pool = case.support_names
        encode = {"encode_s": 0.0}
        if any(m.needs_model for m in methods) and not settings.cold_sessions:
            encode = _encode_query(runner, case.paths[0], settings, progress)
        for method in methods:
            done: dict[tuple[str, ...], dict] = {}  # one run per distinct labelled set
            for order, names in enumerate(support_orders(pool, orders, seed, n)):
                for k in range(1, len(pool) + 1):
                    chosen = tuple(sorted(names[:k]))
                    if chosen not in done:
                        if progress:
                            progress.start(case.name, f"{method.name} k={k}")
                        subset = replace(case, supports=[cases[s] for s in chosen], support_names=list(chosen))
                        done[chosen] = _run_one(method, runner, subset, settings,
                                                encode if method.needs_model else {"encode_s": 0.0}, progress)
                        if progress:
                            progress.advance()
                    records.append(_record(method.name, case.name, order, k, chosen, done[chosen]))
        runner.forget_sessions()
    return records


def planned_runs(cases: dict[str, CasePaths], methods: Sequence[BenchVariant], settings: BenchSettings,
                 orders: int, seed: int) -> int:
    """How many distinct runs ``run_learning_curve`` makes (the progress bar's total)."""
    from .leave_one_out import plan_queries

    total = 0
    for n, (_, pool) in enumerate(plan_queries(cases, settings)):
        sets = {tuple(sorted(o[:k])) for o in support_orders(pool, orders, seed, n) for k in range(1, len(pool) + 1)}
        total += len(sets)
    return total * len(methods)


def _record(method: str, query: str, order: int, k: int, supports: tuple[str, ...], run: dict) -> dict:
    dice = {name: s["dice"] for name, s in run.get("structures", {}).items()}
    if dice:
        dice[OVERALL] = float(np.mean(list(dice.values())))
    return {"method": method, "case": query, "order": order, "k": k, "supports": list(supports),
            "status": run["status"], "error": run.get("error"), "method_s": run.get("method_s"), "dice": dice}


def summarize_curve(records: Sequence[dict]) -> list[dict]:
    """Per (method, k, structure): mean ± sd of Dice over queries and orders, and the failed runs left out."""
    rows = []
    keys = dict.fromkeys((r["method"], r["k"]) for r in records)
    for method, k in keys:
        group = [r for r in records if r["method"] == method and r["k"] == k]
        ok = [r for r in group if r["status"] == "ok"]
        structures = [s for s in dict.fromkeys(s for r in ok for s in r["dice"]) if s != OVERALL] + [OVERALL]
        for structure in structures:
            stats = summarize(r["dice"][structure] for r in ok if structure in r["dice"])
            rows.append({"method": method, "k": k, "structure": structure, "mean": stats.mean, "sd": stats.sd,
                         "n": stats.n, "failed": len(group) - len(ok)})
    return rows


def markdown_table(summary: Sequence[dict]) -> str:
    """k -> mean Dice ± sd per structure and overall, one row per method and k."""
    structures = list(dict.fromkeys(r["structure"] for r in summary))
    lines = ["| method | k | " + " | ".join(structures) + " | runs | failed |",
             "|---|---|" + "---|" * len(structures) + "---|---|"]
    for method, k in dict.fromkeys((r["method"], r["k"]) for r in summary):
        cells = {r["structure"]: r for r in summary if r["method"] == method and r["k"] == k}
        text = [_fmt(cells[s]) if s in cells else "–" for s in structures]
        any_row = next(iter(cells.values()))
        lines.append(f"| {method} | {k} | " + " | ".join(text) + f" | {cells.get(OVERALL, any_row)['n']} | "
                     f"{any_row['failed']} |")
    return "\n".join(lines)


def write_learning_curve(records: Sequence[dict], summary: Sequence[dict], settings: dict, out: Path) -> list[Path]:
    """The summary and every run as CSV, all of it as JSON, and the plot (when matplotlib is there)."""
    out = Path(out)
    _write_csv(out / CSV_NAME, ("method", "k", "structure", "mean", "sd", "n", "failed"), summary)
    runs = [{**{k: r[k] for k in ("method", "case", "order", "k", "status", "method_s")},
             "supports": ";".join(r["supports"]), "structure": s, "dice": d, "error": r["error"] or ""}
            for r in records for s, d in (r["dice"].items() or [("", None)])]
    _write_csv(out / RUNS_CSV, ("method", "case", "order", "k", "supports", "structure", "dice", "method_s",
                                "status", "error"), runs)
    write_json_atomic(finite_json({"settings": settings, "summary": list(summary), "runs": list(records)}),
                      out / JSON_NAME)
    plots = write_plots(((PLOT_NAME, _plot),), list(summary), out)
    return [out / CSV_NAME, out / RUNS_CSV, out / JSON_NAME, *plots]


def _write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict]) -> None:
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})


def _plot(plt, summary: list[dict]):
    """Mean Dice against k, a line per structure (overall in bold), ± sd shaded; a panel per method."""
    methods = list(dict.fromkeys(r["method"] for r in summary))
    if not methods:
        return None
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        rows = [r for r in summary if r["method"] == method and r["mean"] is not None]
        for structure in dict.fromkeys(r["structure"] for r in rows):
            line = [r for r in rows if r["structure"] == structure]
            k = np.array([r["k"] for r in line])
            mean, sd = np.array([r["mean"] for r in line]), np.array([r["sd"] or 0.0 for r in line])
            bold = structure == OVERALL
            (drawn,) = ax.plot(k, mean, marker="o", lw=2.5 if bold else 1.2, color="k" if bold else None,
                               label=structure)
            ax.fill_between(k, mean - sd, mean + sd, alpha=0.12, color=drawn.get_color())
        ax.set_xticks(sorted({r["k"] for r in rows}))
        ax.set_ylim(0, 1)
        ax.set_xlabel("labelled cases (k)")
        ax.set_ylabel("3D Dice")
        ax.set_title(f"{method}: Dice as the labelled set grows")
        ax.legend(fontsize=7)
    return fig


def learning_curve(cases: dict[str, CasePaths], methods: Sequence[BenchVariant], settings: BenchSettings, out: Path,
                   orders: int = 3, seed: int = 0, quiet: bool = False) -> tuple[list[dict], list[dict], list[Path]]:
    """The whole command: runs, summary, files; the one runner is built here and forgotten after."""
    from ..run.runner import Runner

    check_curve(methods, orders, settings)
    runner = Runner(save_support_features=False)
    progress = BenchProgress(planned_runs(cases, methods, settings, orders, seed), enabled=not quiet)
    start = time.perf_counter()
    try:
        records = run_learning_curve(cases, methods, runner, settings, orders, seed, progress)
    finally:
        progress.close()
        runner.forget()
    summary = summarize_curve(records)
    info = {"methods": [m.name for m in methods], "orders": orders, "seed": seed, "cases": list(cases),
            "tolerance_mm": settings.tolerance_mm, "seconds": round(time.perf_counter() - start, 1)}
    return records, summary, write_learning_curve(records, summary, info, out)
