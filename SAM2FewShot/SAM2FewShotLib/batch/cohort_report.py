"""The cohort report: a row per case (time, slices, volume per structure in ml, SAM2's mean object score,
slices to check, Dice and HD95 with ground truth, the error of a failed case) as CSV and Markdown,
a summary, and a PNG of time and volume per case."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from ..bench.results import write_plots
from ..common.files import replacing
from .cohort import Case
from .manifest import CSV_NAME, MARKDOWN_NAME, PLOT_NAME


def cohort_rows(cases: Sequence[Case], records: dict) -> tuple[list[str], list[dict]]:
    """The CSV header and a row per case, in the cohort's order (cases not run yet included)."""
    structures = sorted({name for c in cases for name in records.get(c.id, {}).get("volume_ml", {})})
    scored = sorted({name for c in cases for name in records.get(c.id, {}).get("scores", {}) if name != "error"})
    header = ["case", "status", "seconds", "slices", *(f"volume_ml:{s}" for s in structures), "mean_object_score",
              "low_confidence_slices", *(f"{m}:{s}" for s in scored for m in ("dice", "hd95_mm")), "attempts",
              "error"]
    rows = []
    for case in cases:
        r = records.get(case.id, {})
        row = {"case": case.id, "status": r.get("status", "not run"), "seconds": r.get("seconds"),
               "slices": r.get("slices"), "mean_object_score": r.get("mean_object_score"),
               "low_confidence_slices": r.get("low_confidence_slices"), "attempts": r.get("attempts"),
               "error": r.get("error") or r.get("scores", {}).get("error")}
        row.update({f"volume_ml:{s}": r.get("volume_ml", {}).get(s) for s in structures})
        for s in scored:
            score = r.get("scores", {}).get(s, {})
            row[f"dice:{s}"], row[f"hd95_mm:{s}"] = score.get("dice"), score.get("hd95_mm")
        rows.append(row)
    return header, rows


def summary(header: list[str], rows: list[dict], wall_s: float | None = None) -> dict:
    done = [r for r in rows if r["status"] == "done"]
    seconds = [r["seconds"] for r in done if isinstance(r["seconds"], (int, float))]
    out = {"cases": len(rows), "done": len(done), "failed": sum(r["status"] == "failed" for r in rows),
           "not_run": sum(r["status"] == "not run" for r in rows),
           "mean_seconds": _mean(seconds), "wall_s": None if wall_s is None else round(wall_s, 1)}
    if wall_s and done:
        out["cases_per_hour"] = round(3600.0 * len(done) / wall_s, 1)
    for column in header:
        if column.startswith(("dice:", "hd95_mm:", "volume_ml:")):
            out[f"mean {column}"] = _mean([r[column] for r in done if isinstance(r[column], (int, float))])
    return out


def write_report(cases: Sequence[Case], records: dict, folder: Path, wall_s: float | None = None) -> list[Path]:
    """cohort.csv, cohort.md and cohort.png in ``folder``; the paths written."""
    header, rows = cohort_rows(cases, records)
    totals = summary(header, rows, wall_s)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    paths = []
    for name, content in ((CSV_NAME, text.getvalue()), (MARKDOWN_NAME, markdown(header, rows, totals))):
        with replacing(folder / name) as tmp:
            tmp.write_text(content, encoding="utf-8")
        paths.append(folder / name)
    return paths + write_plots(((PLOT_NAME, _plot),), rows, folder)


def markdown(header: list[str], rows: list[dict], totals: dict) -> str:
    lines = ["# Cohort", "",
             f"{totals['done']} of {totals['cases']} cases done, {totals['failed']} failed, "
             f"{totals['not_run']} not run."]
    if totals.get("cases_per_hour"):
        lines.append(f"This run: {totals['wall_s']} s, {totals['cases_per_hour']} cases per hour.")
    means = [(k[5:], v) for k, v in totals.items() if k.startswith("mean ") and v is not None]
    if totals["mean_seconds"] is not None:
        lines.append(f"Mean time per case: {totals['mean_seconds']} s.")
    if means:
        lines += ["", "| mean over done cases | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in means]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return round(sum(values) / len(values), 4) if values else None


def _plot(plt, rows: list[dict]):
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return None
    structures = sorted({k[len("volume_ml:"):] for r in done for k in r if k.startswith("volume_ml:")})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * len(done) + 2), 6), sharex=True)
    x = range(len(done))
    top.bar(x, [r["seconds"] or 0 for r in done], color="#4c72b0")
    top.set_ylabel("seconds")
    top.set_title("time and volume per case")
    width = 0.8 / max(1, len(structures))
    for n, s in enumerate(structures):
        bottom.bar([i + n * width for i in x], [r.get(f"volume_ml:{s}") or 0 for r in done], width, label=s)
    bottom.set_ylabel("volume (ml)")
    bottom.set_xticks(list(x))
    bottom.set_xticklabels([r["case"] for r in done], rotation=60, ha="right", fontsize=7)
    if structures:
        bottom.legend(fontsize=7)
    return fig
