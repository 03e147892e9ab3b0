"""One case of a cohort: its request, its run, its outputs and the record the manifest keeps.

The same function serves the local runner and the Ray actors, so a case gives the same outputs
wherever it runs. A case whose outputs are already complete for these options (written by a run
that stopped before it could record them) is taken as it is, never computed or written twice.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..common.errors import SAM2FewShotError
from ..common.progress import ProgressFn
from ..io.slicing import slicing_axis
from ..run.outputs import written_files
from ..run.reports import low_confidence_slices
from ..run.request import Request
from .cohort import Case
from .compute import ran_with
from .manifest import failed, files_record, input_stamp, output_names


def case_request(template: Request, case: Case, folder: Path, suffix: str) -> Request:
    """The template with this case's query (and prompt labels) and outputs in the cohort's folder."""
    labels, report = output_names(case, suffix)
    prompts = str(case.prompt_labels) if case.prompt_labels else template.prompt_labels
    return replace(template, query=str(case.query), prompt_labels=prompts, out=str(folder / labels),
                   report=str(folder / report))


def check_case_outputs(cases, template: Request, folder: Path, suffix: str) -> None:
    """Before any work: no case's outputs would replace a file the cohort reads (any case's query or
    prompt labels, the supports, the library, their sidecars and indexes), and every name fits the file
    system. Only inputs that could be an output (in the folder, or a hard link) are compared per case."""
    from ..run.input_files import input_files, label_files, volume_files
    from ..run.outputs import check_outputs

    inputs = input_files(replace(template, query=str(cases[0].query), prompt_labels=None))
    for case in cases[1:]:
        inputs += volume_files(case.query, f"the query of case {case.id}")
    for case in cases:
        if case.prompt_labels:
            inputs += label_files(case.prompt_labels, f"the prompt labels of case {case.id}")
    requests = [case_request(template, case, folder, suffix) for case in cases]
    here = Path(folder).resolve()
    outputs = {_identity(Path(r.out)) for r in requests} | {_identity(Path(r.report)) for r in requests}
    near = [f for f in inputs if f.folder or f.path.resolve().parent == here or _identity(f.path) in outputs - {None}]
    for request in requests:
        check_outputs(request.out, request.report, near)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def run_case(runner, case: Case, template: Request, folder: Path, suffix: str, options: str,
             progress: ProgressFn | None = None, tolerance_mm: float = 1.0, adopt: bool = False) -> dict:
    """Segment one case and write its outputs; the manifest record: done, or failed with its one line.
    ``adopt``: complete outputs already there may be taken as they are (Manifest.may_adopt)."""
    from ..run.outputs import write_outputs
    from ..run.worker import causes, error_message, is_out_of_memory

    request = case_request(template, case, folder, suffix)
    adopted = completed_record(case, request, options) if adopt else None
    if adopted is not None:
        return adopted
    start = time.perf_counter()
    try:
        labels, report = runner.run(request, progress)
        report["batch"] = {"case": case.id, "options": options, "input": input_stamp(case)}
        summary = case_summary(labels, report, template, case.truth, tolerance_mm)
        write_outputs(labels, report, request.out, request.report)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - one failed case is recorded; the cohort goes on
        if any(is_out_of_memory(e) for e in causes(exc)):
            runner.forget()  # the next case starts with free memory
        return failed(case, options, error_message(exc) if not isinstance(exc, SAM2FewShotError) else str(exc))
    return {"status": "done", "options": options, "input": input_stamp(case), "compute": ran_with(report),
            "files": files_record(folder, written_files(request.out, request.report)),
            "seconds": round(time.perf_counter() - start, 3), **summary}


def completed_record(case: Case, request: Request, options: str) -> dict | None:
    """The record of outputs a stopped run wrote completely for these options and this query, or None."""
    from ..io.volume_io import read_labels

    report_path, out = Path(request.report), Path(request.out)
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        batch, ran = report.get("batch", {}), ran_with(report)
        if batch.get("options") != options or batch.get("input") != input_stamp(case) or not out.is_file():
            return None
        if ran is not None and ran["precision"] != request.model.precision:  # another precision is not this run's
            return None
        labels = read_labels(out)  # complete and readable, or it is done again
    except (OSError, ValueError, AttributeError, SAM2FewShotError):
        return None
    template = Request(method=report.get("method", ""), query=str(case.query))
    return {"status": "done", "options": options, "input": input_stamp(case), "adopted": True,
            "compute": ran_with(report),
            "files": files_record(out.parent, written_files(out, report_path)),
            "seconds": report.get("timing", {}).get("total_s"),
            **case_summary(labels, report, template, None)}


def add_missing_scores(cases, records: dict, folder: Path, tolerance_mm: float = 1.0) -> None:
    """Dice and HD95 for done cases that have ground truth now but were segmented without it."""
    from ..io.volume_io import read_labels

    for case in cases:
        record = records.get(case.id, {})
        if case.truth is None or record.get("status") != "done" or "scores" in record:
            continue
        label_file = next((name for name in record.get("files", {}) if not name.endswith(".json")), None)
        if label_file is not None:
            try:
                record["scores"] = _scores(read_labels(folder / label_file), case.truth, tolerance_mm)
            except SAM2FewShotError as exc:
                record["scores"] = {"error": str(exc)}


def case_summary(labels, report: dict, template: Request, truth: Path | None, tolerance_mm: float = 1.0) -> dict:
    """What the cohort report shows of a case: slices, volume per structure, SAM2's confidence, and
    with ground truth, Dice and HD95 per structure (the truth is read only now)."""
    volume = labels.volume
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    counts = np.bincount(volume.array.ravel(), minlength=max([s.value for s in labels.segments], default=0) + 1)
    summary = {
        "slices": int(report.get("session", {}).get("num_slices")
                      or volume.array.shape[slicing_axis(volume, template.frames.axis)]),
        "volume_ml": {s.name: round(float(counts[s.value]) * voxel_ml, 3) for s in labels.segments},
        "mean_object_score": _mean_score(report),
        "low_confidence_slices": len({flag.slice for flag in low_confidence_slices(report)}),  # slices, not flags
    }
    if truth is not None:
        summary["scores"] = _scores(labels, truth, tolerance_mm)
    return summary


def _mean_score(report: dict) -> float | None:
    scores = [obj["object_score"] for entry in report.get("slices", []) for obj in entry.get("objects", {}).values()
              if obj.get("object_score") is not None]
    return round(float(np.mean(scores)), 4) if scores else None


def _scores(labels, truth: Path, tolerance_mm: float) -> dict:
    from ..bench.metrics import score_labels
    from ..io.volume_io import read_labels

    try:
        scores = score_labels(labels, read_labels(truth, reference=labels.volume), tolerance_mm)
    except SAM2FewShotError as exc:
        return {"error": str(exc)}
    return {name: {"dice": round(s.dice, 4), "hd95_mm": None if math.isinf(s.hd95_mm) else round(s.hd95_mm, 3)}
            for name, s in scores.items()}
