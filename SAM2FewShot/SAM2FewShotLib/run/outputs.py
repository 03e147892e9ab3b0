"""Where a run's result goes: checked before any work, written together or not at all.

Every front end that writes files (CLI, worker, demo) checks its outputs through ``check_outputs``
before the model loads and writes through ``write_outputs``: the report is written beside its
place first, then the label file (with its JSON sidecar) is moved into place, then the report. A
failure at any step leaves the files that were there before as they were.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..common.errors import InputError
from ..common.files import replacing, sweep_stale_temporaries
from ..io.volume import LabelMap
from ..io.volume_io import SEG_NRRD, WRITE_SUFFIXES, image_suffix, sidecar_path, write_labels

LABEL_SUFFIXES = WRITE_SUFFIXES + (SEG_NRRD,)


def default_report_path(out) -> Path:
    """result.seg.nrrd -> result_report.json, beside it."""
    out = Path(out)
    suffix = image_suffix(out)
    stem = out.name[: len(out.name) - len(suffix)] if suffix in LABEL_SUFFIXES else out.name
    return out.with_name(stem + "_report.json")


def check_writable(path) -> None:
    """Fail before any work when ``path`` cannot be written."""
    path = Path(path)
    parent = path.resolve().parent
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: folder {parent} is not writable")


def written_files(out, report) -> list[Path]:
    """Every file a run writes: the labels, their JSON sidecar (plain label formats) and the report."""
    out = Path(out)
    sidecar = [sidecar_path(out)] if image_suffix(out) != SEG_NRRD else []
    return [out, *sidecar, Path(report)]


def check_outputs(out, report: str | None = None, inputs: Iterable[str] = ()) -> Path:
    """The report path (default beside ``out``), once nothing written would clash with anything else.

    A label format that cannot be written, an unwritable folder, the report landing on the label file
    or its sidecar, or an output that is one of the run's own inputs: each refused before any work.
    """
    out = Path(out)
    if image_suffix(out) not in LABEL_SUFFIXES:
        raise InputError(f"cannot write {out}: use one of {', '.join(LABEL_SUFFIXES)}")
    report_path = Path(report) if report is not None else default_report_path(out)
    check_writable(out)
    check_writable(report_path)
    files = [f.resolve() for f in written_files(out, report_path)]
    for f in files:  # what an earlier run that was killed while writing left here
        sweep_stale_temporaries(f)
    if files[-1] in files[:-1]:
        raise InputError(f"the report {report_path} would overwrite the label file or its JSON sidecar")
    for source in inputs:
        if Path(source).resolve() in files:
            raise InputError(f"the output {source} is also an input of this run: choose another output name")
    return report_path


def write_outputs(labels: LabelMap, report: dict, out, report_path) -> None:
    """The label file and the report, both or neither (an old result stays whole if this one fails)."""
    try:
        with replacing(Path(report_path)) as tmp:  # renamed into place only once the labels are
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
            write_labels(labels, out)
    except OSError as exc:
        raise InputError(f"cannot write {report_path}: {exc.strerror or exc}") from exc
