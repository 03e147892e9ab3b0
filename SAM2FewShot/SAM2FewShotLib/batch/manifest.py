"""What a cohort's output folder holds: one record per case in ``manifest.json``, written atomically.

A case counts as done only when its record says so, was made with the same options, from the same
query file, and its label file and report are still there with the sizes and SHA-256 recorded: a
half-written or damaged output is done again. Failed cases are recorded with their one-line error.
Only the process driving the cohort writes the manifest (Ray actors return their records to it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common.digests import file_digest, json_digest
from ..common.errors import InputError
from ..common.files import write_json_atomic
from ..common.names import check_distinct, file_name
from ..run.outputs import written_files
from ..run.request import Request
from .cohort import Case
from .conditioning import Conditioning, file_stamp

MANIFEST = "manifest.json"
FORMAT = "sam2fewshot-cohort-1"
LOCK = "sam2fewshot.lock"
LOGS = "logs"  # Ray's own log lines (batch/on_ray.py)
CSV_NAME, MARKDOWN_NAME, PLOT_NAME = "cohort.csv", "cohort.md", "cohort.png"  # the cohort report
# The folder's own files, which no case may write: names kept for the review records to come included.
FOLDER_FILES = (MANIFEST, LOCK, LOGS, CSV_NAME, MARKDOWN_NAME, PLOT_NAME, "review.json", "review.csv", "corrected")


def options_digest(template: Request) -> str:
    """What the outputs depend on besides the query and what conditions it: method, parameters, the
    library's identity (not its content), model, frames. A change means the existing outputs are another
    run's. The supports and the library's cases are compared apart (batch/conditioning.py: a grown set
    is not other options), as are the precision and threads that ran (batch/compute.py)."""
    data = _options_data(template)
    data.pop("supports", None)
    return json_digest(data, 20)


def legacy_options_digest(template: Request) -> str:
    """The options digest of cohorts written before the conditioning was compared apart (supports and
    their files' stamps inside it): their cases resume as they are."""
    data = _options_data(template)
    data["support_files"] = [file_stamp(p) for pair in template.supports for p in pair]
    return json_digest(data, 20)


def _options_data(template: Request) -> dict:
    data = asdict(template)
    for key in ("query", "out", "report", "prompt_labels"):
        data.pop(key, None)
    data["model"].update(threads=None, precision=None)
    if data["frames"].get("series") is None:  # as before --series existed: earlier cohorts resume
        data["frames"].pop("series", None)
    return data


def input_stamp(case: Case) -> list:
    """The case's own inputs as they are now: a query edited since is segmented again."""
    return [file_stamp(case.query), file_stamp(case.prompt_labels) if case.prompt_labels else None]


@dataclass
class Manifest:
    folder: Path
    cases: dict
    conditioning: dict = field(default_factory=dict)  # digest -> the cases it stands for (batch/conditioning)

    @classmethod
    def open(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.exists():
            return cls(Path(folder), {})
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}")
            cases, conditioning = data["cases"], data.get("conditioning", {})
            if not isinstance(cases, dict):
                raise ValueError("'cases' is not a table of case records")
            if not isinstance(conditioning, dict) or not all(isinstance(m, list) for m in conditioning.values()):
                raise ValueError("'conditioning' is not a table of case lists")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path} is not a cohort manifest this version can read ({exc}): give another --out "
                             "folder") from None
        for case_id, entry in cases.items():
            _check_entry(path, case_id, entry)
        return cls(Path(folder), dict(cases), dict(conditioning))

    def save(self) -> None:
        used = {e.get("conditioning") for e in self.cases.values() if isinstance(e, dict)}
        conditioning = {k: v for k, v in self.conditioning.items() if k in used}
        write_json_atomic({"format": FORMAT, "cases": self.cases, "conditioning": conditioning},
                          self.folder / MANIFEST)

    def record(self, case_id: str, record: dict) -> None:
        self.cases[case_id] = record
        self.save()

    def status(self, case: Case, options: str, conditioning: Conditioning | None = None,
               legacy_options: str | None = None) -> str:
        """'reviewed' (never touched again), 'done', 'failed', 'grown' (conditioned on a set that has
        grown since), 'other options' (done by another run's options), or 'todo'. Done only when every
        file the record lists is there with the size and hash recorded."""
        entry = self.cases.get(case.id)
        if entry is not None and entry.get("review"):
            return "reviewed"
        if entry is None or entry.get("input") != input_stamp(case):
            return "todo"
        if entry.get("options") not in (options, legacy_options):
            return "other options"
        if entry.get("status") == "failed":
            return "failed"
        ran_on = entry.get("conditioning")
        if conditioning is not None and ran_on is not None and ran_on != conditioning.digest:
            return "grown" if conditioning.grew_from(self.conditioning.get(ran_on, [])) else "other options"
        return "done" if entry.get("status") == "done" and self.outputs_intact(entry) else "todo"

    def outputs_intact(self, entry: dict) -> bool:
        for name, (size, digest) in entry.get("files", {}).items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != size or file_digest(path) != digest:
                return False
        return bool(entry.get("files"))

    def may_adopt(self, case: Case) -> bool:
        """Whether complete outputs found on disk may be taken as this case's without running it: only
        when the manifest records no outputs for it (their writer died before recording them). Outputs
        that differ from what it records are another's (damaged, or replaced by hand): done again."""
        return not self.cases.get(case.id, {}).get("files")


def _check_entry(path: Path, case_id, entry) -> None:
    """One line, not a traceback, for a record edited by hand into something this version cannot read."""
    problem = None
    if not isinstance(entry, dict):
        problem = "it is not a record"
    elif not isinstance(entry.get("files", {}), dict):
        problem = "its 'files' is not a table"
    else:
        for name, stamp in entry.get("files", {}).items():
            if Path(name).name != name or name in ("", ".", ".."):
                problem = f"its file {name!r} is not a name in the folder"
            elif not (isinstance(stamp, list) and len(stamp) == 2 and isinstance(stamp[0], int)
                      and isinstance(stamp[1], str)):
                problem = f"its file {name!r} has no [size, sha256]"
    review = entry.get("review") if isinstance(entry, dict) else None
    if problem is None and review is not None:
        files = review.get("files", {}) if isinstance(review, dict) else None
        if not isinstance(files, dict) or not all(
                isinstance(n, str) and n.startswith("corrected/") and Path(n).name == n[len("corrected/"):]
                for n in files):
            problem = "its review is not a review record"
    if problem:
        raise InputError(f"{path}: the record of case {case_id!r} is damaged ({problem}): restore the manifest, "
                         "or give another --out folder")


def output_names(case: Case, suffix: str) -> tuple[str, str]:
    """The label file and the report of a case, relative to the output folder: the id as a file name
    (common/names), so no id writes outside the folder."""
    name = file_name(case.id)
    return f"{name}{suffix}", f"{name}_report.json"


def case_files(case: Case, suffix: str) -> list[str]:
    """Every file a case writes in the folder: labels, their sidecar (plain label formats), report."""
    labels, report = output_names(case, suffix)
    return [p.name for p in written_files(Path(labels), Path(report))]


def check_case_names(cases, suffix: str) -> None:
    """Before any work: no two cases write one file (also on case-insensitive file systems), and no case
    writes one of the folder's own files (the manifest, the cohort report, the lock)."""
    check_distinct({c.id: case_files(c, suffix) for c in cases}, FOLDER_FILES)


def files_record(folder: Path, names) -> dict:
    """name -> [size, sha256] of written outputs (the sidecar of a plain label file included)."""
    return {str(Path(p).relative_to(folder)): [os.path.getsize(p), file_digest(p)] for p in names if Path(p).is_file()}


def failed(case: Case, options: str, error: str, attempts: int = 1) -> dict:
    return {"status": "failed", "options": options, "input": input_stamp(case), "error": error, "attempts": attempts}
