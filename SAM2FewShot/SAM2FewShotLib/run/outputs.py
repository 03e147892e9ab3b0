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
from ..common.files import final_path, replacing, sweep_stale_temporaries, temporary_name_bytes
from ..common.paths import check_path_text, name_bytes, name_limit, shown
from ..io.volume import LabelMap
from ..io.volume_io import SEG_NRRD, WRITE_SUFFIXES, image_suffix, sidecar_path, write_labels
from .input_files import InputFile

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
    """Every file a run writes: the labels, their JSON sidecar (plain label formats) and the report.
    Labels written through a symlink have their sidecar beside the link's target, where they land."""
    out = Path(out)
    sidecar = [sidecar_path(final_path(out))] if image_suffix(out) != SEG_NRRD else []
    return [out, *sidecar, Path(report)]


def check_outputs(out, report: str | None = None, inputs: Iterable = ()) -> Path:
    """The report path (default beside ``out``), once nothing written would clash with anything else.

    A path that is not UTF-8, a label format that cannot be written, a name (or its temporary's) too
    long for the file system, an unwritable folder, the report landing on the label file or its
    sidecar, or an output that would replace any file of an input (``inputs``: InputFile entries from
    run/input_files.py, or plain paths): each refused before any work, in one line naming both.
    """
    out = Path(out)
    report_path = Path(report) if report is not None else default_report_path(out)
    check_path_text(out, "the output")
    check_path_text(report_path, "the report")
    if image_suffix(out) not in LABEL_SUFFIXES:
        raise InputError(f"cannot write {out}: use one of {', '.join(LABEL_SUFFIXES)}")
    named = _named_outputs(out, report_path)
    for path, desc in named:
        check_name_length(path, desc)
    for path, _ in named:
        check_writable(path)
    files = [f.resolve() for f, _ in named]
    for f in files:  # what an earlier run that was killed while writing left here
        sweep_stale_temporaries(f)
    if files[-1] in files[:-1]:
        raise InputError(f"the report {report_path} would overwrite the label file or its JSON sidecar")
    _refuse_inputs(named, [i if isinstance(i, InputFile) else InputFile(Path(i), "an input", given=True)
                           for i in inputs])
    return report_path


def _named_outputs(out: Path, report: Path) -> list[tuple[Path, str]]:
    """Each file the run writes with the words that name it in a message."""
    labels, *sidecar, report = written_files(out, report)
    return [(labels, f"the output {labels}"), *[(s, f"the output's names-and-colours sidecar {s}") for s in sidecar],
            (report, f"the report {report}")]


def check_name_length(path: Path, desc: str) -> None:
    """InputError unless the name, and the temporary it is written through, fit its file system's limit
    (bytes in one name): checked before any work, not found when the result is written."""
    limit = name_limit(path.resolve().parent)
    given = name_bytes(path)
    final = final_path(path) if given <= limit else path  # a name too long cannot even be looked at
    longest = max(given, name_bytes(final), temporary_name_bytes(final.resolve()))
    if longest > limit:
        part = "its name" if max(given, name_bytes(final)) > limit else "the temporary it is written through"
        raise InputError(f"{shown(desc)}: {part} would be {longest} bytes long, more than the {limit} bytes its "
                         "file system allows in a name: choose a shorter name")


def _refuse_inputs(outputs: list[tuple[Path, str]], inputs: list[InputFile]) -> None:
    """InputError naming the output and the input file it would replace: the same file by path after
    symlinks, by hard link, or a file inside an input's index folder."""
    sources = [(source, source.path.resolve()) for source in inputs]
    identities = {_identity(target): source for source, target in sources if not source.folder}
    identities.pop(None, None)
    for path, desc in outputs:
        resolved = path.resolve()
        hit = identities.get(_identity(resolved)) or next(
            (s for s, target in sources if target == resolved or (s.folder and resolved.is_relative_to(target))), None)
        if hit is None:
            continue
        if hit.given:
            raise InputError(f"{desc} is also an input of this run ({hit.what}): choose another output name")
        raise InputError(f"{desc} would replace {hit.what}: choose another output name")


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file: two names of one file (a hard link) have the same."""
    try:
        info = path.stat()
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino)


def write_outputs(labels: LabelMap, report: dict, out, report_path) -> None:
    """The label file and the report, both or neither (an old result stays whole if this one fails)."""
    try:
        with replacing(Path(report_path)) as tmp:  # renamed into place only once the labels are
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
            write_labels(labels, out)
    except OSError as exc:
        raise InputError(f"cannot write {report_path}: {exc.strerror or exc}") from exc
