"""Reviewing a cohort: which cases need a look first, and the reviewer's decisions kept in its folder.

The queue puts failed cases first, then the cases not yet reviewed by how much they need a look
(``need_score``), then those not run yet, then the reviewed ones. A decision (accepted, rejected, or
corrected with the corrected labels) is written at once into the cohort's folder under its lock
(batch/lock.py, the one ``batch`` holds while it runs), the corrected labels as their own file under
``corrected/`` (named by common/names, written all or none), and recorded in ``manifest.json``
beside the original result, which stays as it was: both are checked against their own size and hash.
A reviewed case is never touched by a later ``batch`` run. Nothing here loads a model.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import InputError
from ..common.names import file_name
from ..io.volume import LabelMap
from .lock import FolderLock
from .manifest import LOCK, MANIFEST, Manifest

DECISIONS = ("accepted", "rejected", "corrected")
CORRECTED = "corrected"  # the folder of corrected label files, inside the cohort folder
VOLUME_SPREAD = math.log(4.0)  # a structure 4x (or 1/4 of) the cohort's median volume counts fully


@dataclass(frozen=True)
class QueueRow:
    case: str
    status: str  # "failed", "to review", "not run", or the decision of a reviewed case
    score: float | None  # need_score of a case to review (higher: look first)
    reasons: tuple[str, ...]  # what makes the score, in words
    flagged_slices: int
    mean_object_score: float | None
    error: str = ""

    def as_json(self) -> dict:
        return {"case": self.case, "status": self.status, "score": self.score, "reasons": list(self.reasons),
                "flagged_slices": self.flagged_slices, "mean_object_score": self.mean_object_score,
                "error": self.error}


def need_score(record: dict, medians: dict[str, float]) -> tuple[float, tuple[str, ...]]:
    """How much a done case needs a look: the sum of three parts, each from 0 to 1.

    - the share of its slices SAM2 was unsure of (low-confidence slices / slices);
    - 1 - sigmoid(mean object score): SAM2's overall doubt;
    - the largest |log(volume / cohort median volume)| of its structures over log(4), capped at 1: a
      structure 4x (or a quarter of) the median, or missing where the cohort has it, counts fully.
    """
    slices = max(int(record.get("slices") or 0), 1)
    flagged = int(record.get("low_confidence_slices") or 0)
    share = min(flagged / slices, 1.0)
    mean = record.get("mean_object_score")
    doubt = 1.0 - 1.0 / (1.0 + math.exp(-float(mean))) if mean is not None else 0.5
    deviation, worst = 0.0, ""
    for name, median in medians.items():
        volume = float(record.get("volume_ml", {}).get(name, 0.0))
        part = 1.0 if volume <= 0 else min(abs(math.log(volume / median)) / VOLUME_SPREAD, 1.0)
        if part > deviation:
            deviation, worst = part, name
    reasons = [f"{flagged} of {slices} slices flagged"] if flagged else []
    reasons += [f"mean object score {mean:.2f}"] if mean is not None and doubt >= 0.5 else []
    reasons += [f"{worst} volume off the cohort median"] if deviation >= 0.5 else []
    return round(share + doubt + deviation, 4), tuple(reasons)


def review_queue(folder: Path) -> list[QueueRow]:
    """The cohort's cases in the order to look at them (module docstring)."""
    cases = Manifest.open(folder).cases
    if not cases:
        raise InputError(f"{folder} holds no cohort manifest ({MANIFEST}): give the --out folder of a batch run")
    medians = cohort_medians(cases)
    rows = [_row(case_id, record, medians) for case_id, record in cases.items()]
    order = {"failed": 0, "to review": 1, "not run": 2}
    return sorted(rows, key=lambda r: (order.get(r.status, 3), -(r.score or 0.0), r.case))


def cohort_medians(cases: dict) -> dict[str, float]:
    """Each structure's median volume (ml) over the done cases that have it."""
    volumes: dict[str, list[float]] = {}
    for record in cases.values():
        if record.get("status") == "done":
            for name, ml in record.get("volume_ml", {}).items():
                if ml and ml > 0:
                    volumes.setdefault(name, []).append(float(ml))
    return {name: statistics.median(values) for name, values in volumes.items()}


def _row(case_id: str, record: dict, medians: dict[str, float]) -> QueueRow:
    flagged, mean = int(record.get("low_confidence_slices") or 0), record.get("mean_object_score")
    review = record.get("review")
    if review:
        return QueueRow(case_id, review.get("decision", "reviewed"), None, (), flagged, mean)
    if record.get("status") == "failed":
        return QueueRow(case_id, "failed", None, (), 0, None, str(record.get("error", "")))
    if record.get("status") != "done":
        return QueueRow(case_id, "not run", None, (), 0, None)
    score, reasons = need_score(record, medians)
    return QueueRow(case_id, "to review", score, reasons, flagged, mean)


@dataclass(frozen=True)
class CaseFiles:
    """What the reviewer opens: the query, the result (and its correction, once made), the report."""

    query: Path
    result: Path
    report: Path | None
    corrected: Path | None


def case_files(folder: Path, case_id: str) -> CaseFiles:
    record = _record(Manifest.open(folder), case_id)
    names = list(record.get("files", {}))
    labels = next((n for n in names if not n.endswith(".json")), None)
    if record.get("status") != "done" or labels is None:
        raise InputError(f"case {case_id} has no result to review ({record.get('status', 'not run')})")
    report = next((n for n in names if n.endswith("_report.json")), None)
    corrected = next((n for n in record.get("review", {}).get("files", {}) if not n.endswith(".json")), None)
    query = Path(record["input"][0][0])
    return CaseFiles(query, folder / labels, folder / report if report else None,
                     folder / corrected if corrected else None)


def flagged_slices(report: dict) -> list[int]:
    """The slices to check, most doubtful first, each once (run/reports.low_confidence_slices)."""
    from ..run.reports import low_confidence_slices

    return list(dict.fromkeys(flag.slice for flag in low_confidence_slices(report)))


def record_review(folder: Path, case_id: str, decision: str, corrected: LabelMap | None = None,
                  reviewer: str = "") -> dict:
    """Write a decision (and the corrected labels) into the cohort folder, under its lock; the review record."""
    if decision not in DECISIONS:
        raise InputError(f"unknown decision {decision!r}: one of {', '.join(DECISIONS)}")
    if (decision == "corrected") != (corrected is not None):
        raise InputError("a correction comes with its corrected labels, and only a correction does")
    folder = Path(folder)
    with FolderLock(folder, LOCK, what="a review"):
        manifest = Manifest.open(folder)
        record = _record(manifest, case_id)
        if decision != "rejected" and not (record.get("status") == "done" and manifest.outputs_intact(record)):
            raise InputError(f"case {case_id} has no intact result to accept: run batch again first")
        review = {"decision": decision, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reviewer": reviewer,
                  "of": record.get("files", {})}
        if corrected is not None:
            review["files"] = _write_corrected(folder, case_id, record, corrected)
        record["review"] = review
        manifest.record(case_id, record)
    return review


def _record(manifest: Manifest, case_id: str) -> dict:
    record = manifest.cases.get(case_id)
    if record is None:
        raise InputError(f"no case {case_id!r} in {manifest.folder / MANIFEST}")
    return record


def _write_corrected(folder: Path, case_id: str, record: dict, corrected: LabelMap) -> dict:
    """The corrected labels on the result's grid, as corrected/<name><suffix> (with its sidecar); their
    record: name -> [size, sha256], as the manifest keeps the result's."""
    from ..common.digests import file_digest
    from ..io.volume_io import SEG_NRRD, image_suffix, read_labels, sidecar_path, write_labels

    result = next(n for n in record["files"] if not n.endswith(".json"))
    original = read_labels(folder / result)
    if not corrected.volume.same_grid(original.volume):
        raise InputError(f"the corrected labels of case {case_id} are not on its result's grid")
    suffix = image_suffix(Path(result))
    path = folder / CORRECTED / f"{file_name(case_id)}{suffix}"
    path.parent.mkdir(exist_ok=True)
    write_labels(corrected, path)
    written = [path] + ([sidecar_path(path)] if suffix != SEG_NRRD else [])
    return {f"{CORRECTED}/{f.name}": [f.stat().st_size, file_digest(f)] for f in written}
