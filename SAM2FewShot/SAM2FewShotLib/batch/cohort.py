"""The cases of a cohort: every volume in a folder, or the rows of a CSV, each with an id that names
its outputs and, optionally, its ground truth and its prompt labels."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import InputError
from ..io.volume_io import READ_SUFFIXES, SEG_NRRD, image_suffix
from ..library.cases import IMAGE_TOKENS, LABEL_TOKENS, label_base

CSV_COLUMNS = ("id", "query", "labels", "prompt_labels")


@dataclass(frozen=True)
class Case:
    id: str  # names the case's outputs: <id>.nii.gz, <id>_report.json
    query: Path
    truth: Path | None = None  # ground truth, for Dice and HD95 in the cohort report
    prompt_labels: Path | None = None  # for propagate: masks on some slices of this query

    def as_json(self) -> dict:
        return {"id": self.id, "query": str(self.query), "truth": str(self.truth) if self.truth else None,
                "prompt_labels": str(self.prompt_labels) if self.prompt_labels else None}


def find_cases(queries: Path, labels: Path | None = None) -> list[Case]:
    """The cases of a folder of volumes (label files and sidecars left out; DICOM series as subfolders
    of .dcm files) or of a CSV with a ``query`` column (and ``id``, ``labels``, ``prompt_labels``)."""
    queries = Path(queries)
    if queries.is_file() and queries.suffix.lower() == ".csv":
        cases = _from_csv(queries)
    elif queries.is_dir():
        cases = [Case(case_id(p), p) for p in sorted(queries.iterdir()) if _is_query(p)]
        if not cases:
            raise InputError(f"{queries} holds no volume to segment (NIfTI, NRRD, MHA or DICOM series folders)")
    else:
        raise InputError(f"--queries {queries} is neither a folder of volumes nor a .csv file")
    if labels is not None:
        if not Path(labels).is_dir():
            raise InputError(f"--labels {labels} is not a folder")
        cases = [c if c.truth else Case(c.id, c.query, find_truth(Path(labels), c), c.prompt_labels) for c in cases]
    ids = [c.id for c in cases]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise InputError(f"two cases would write the same outputs: {repeated[0]} (give each an id in a CSV)")
    return cases


def case_id(path: Path) -> str:
    """hippocampus_015_img.nii.gz -> hippocampus_015; a DICOM folder -> its name."""
    name = path.name if path.is_dir() else path.name[: len(path.name) - len(image_suffix(path))]
    for token in IMAGE_TOKENS:
        if token and name.lower().endswith(token) and len(name) > len(token):
            return name[: len(name) - len(token)]
    return name


def find_truth(folder: Path, case: Case) -> Path | None:
    """The case's ground truth in ``folder``: the query's own file name (nnU-Net's labelsTr), or the id
    with a label token (X_label, X_seg, ...) or as a .seg.nrrd."""
    names = [case.query.name, *(f"{case.id}{token}{suffix}" for token in ("", *LABEL_TOKENS)
                                for suffix in READ_SUFFIXES)]
    for name in names:
        if (folder / name).is_file() and (folder / name).resolve() != case.query.resolve():
            return folder / name
    return None


def _is_query(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return any(path.glob("*.dcm"))
    suffix = image_suffix(path)
    return suffix in READ_SUFFIXES and suffix != SEG_NRRD and label_base(path) is None


def _from_csv(path: Path) -> list[Case]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not rows or "query" not in rows[0]:
        raise InputError(f"{path} needs a header with a 'query' column (optional: {', '.join(CSV_COLUMNS)})")
    unknown = sorted(set(rows[0]) - set(CSV_COLUMNS))
    if unknown:
        raise InputError(f"{path}: unknown column(s) {', '.join(unknown)}; known are {', '.join(CSV_COLUMNS)}")
    cases = []
    for n, row in enumerate(rows, start=2):
        if not (row.get("query") or "").strip():
            raise InputError(f"{path} line {n}: no query")
        query = _path(path, row["query"])
        cases.append(Case((row.get("id") or "").strip() or case_id(query), query, _path(path, row.get("labels")),
                          _path(path, row.get("prompt_labels"))))
    return cases


def _path(csv_file: Path, text: str | None) -> Path | None:
    if not (text or "").strip():
        return None
    p = Path(text.strip()).expanduser()
    return p if p.is_absolute() else csv_file.parent / p
