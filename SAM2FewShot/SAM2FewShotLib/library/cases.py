"""A labelled support library: many cases (image + label map) found in a folder or listed in a file.

Cases are discovered by name (``X_img`` + ``X_label``, ``X`` + ``X.seg.nrrd``, ``imagesTr/`` +
``labelsTr/``, ...) or listed in a ``library.json``; names and colours come from the .seg.nrrd
or the JSON sidecar that volume_io reads. A case is read only when it is embedded or when one of
its slices is retrieved, so a library of hundreds of cases never sits in memory at once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.errors import InputError, one_line
from ..common.files import writable_folder
from ..common.warnings_summary import RepeatedWarnings
from ..io.normalization import Normalization
from ..io.volume import LabelMap, Volume
from ..io.volume_io import READ_SUFFIXES, SEG_NRRD, image_suffix, read_labels, read_volume, sidecar_path

log = logging.getLogger(__name__)

PathLike = str | Path

INDEX_FOLDER = ".sam2fewshot_index"
LIST_FILE = "library.json"
LABEL_TOKENS = ("_label", "_labels", "-label", "-labels", "_seg", "-seg", "_segmentation", "-segmentation",
                "_mask", "-mask", "_gt")
IMAGE_TOKENS = ("", "_img", "_image", "-image", "_0000", "_vol", "_volume")
LABEL_DIRS = {"labelstr": "imagesTr", "labelsts": "imagesTs", "labels": "images"}

# One row per (labelled slice, structure): which embedding it uses and where the slice sits.
ROW_DTYPE = np.dtype([
    ("emb", "<i8"),  # row of the case's embedding array (a slice's image embedding, shared by its structures)
    ("value", "<u4"),  # label value of the structure
    ("slice", "<i4"),  # slice index along the case's slicing axis
    ("position", "<f4"),  # slice / (num_slices - 1): relative position in the volume
    ("extent_position", "<f4"),  # 0 at the structure's first slice, 1 at its last (0.5 if one)
    ("area", "<i8"),  # voxels of the structure on the slice
])


@dataclass(frozen=True)
class LibraryCase:
    """One labelled case; ``id`` is its label file's path relative to the library (stable, readable)."""

    id: str
    image: Path
    labels: Path

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file whose content decides the case's embeddings and names."""
        sidecar = sidecar_path(self.labels)
        extra = (sidecar,) if image_suffix(self.labels) != SEG_NRRD and sidecar.is_file() else ()
        return (self.image, self.labels) + extra

    def load(self) -> tuple[Volume, LabelMap]:
        image = read_volume(self.image)
        return image, read_labels(self.labels, reference=image)


@dataclass(frozen=True)
class Library:
    """The cases of a library and where it lives (a folder, or the folder of its list file)."""

    root: Path
    cases: tuple[LibraryCase, ...]
    list_file: Path | None = None

    def __len__(self) -> int:
        return len(self.cases)

    def case(self, case_id: str) -> LibraryCase:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise InputError(f"the library {self.root} has no case {case_id}")

    def index_locations(self) -> tuple[Path, Path]:
        """Where an index may live: beside the library, and in the user cache (keyed by that path)."""
        from ..common.cache import cache_dir
        from ..common.digests import text_digest

        beside = self.root / INDEX_FOLDER
        if self.list_file is not None and self.list_file.name != LIST_FILE:
            beside = beside / self.list_file.name
        key = text_digest(str(beside.resolve()), 16)
        return beside, cache_dir() / "library_index" / key

    def index_root(self) -> Path:
        """Beside the library when that is writable, else in the user cache."""
        beside, cached = self.index_locations()
        return beside if writable_folder(beside) else cached


def open_library(path: PathLike) -> Library:
    """A library folder (scanned, or its library.json) or a list file (.json)."""
    path = Path(path).expanduser()
    if path.is_file():
        return _from_list_file(path)
    if not path.is_dir():
        raise InputError(f"library {path} does not exist")
    if (path / LIST_FILE).is_file():
        return _from_list_file(path / LIST_FILE)
    cases = find_cases(path)
    if not cases:
        raise InputError(f"library {path} holds no labelled case: expected pairs such as X_img.nii.gz + "
                         f"X_label.nii.gz, X.nrrd + X.seg.nrrd, imagesTr/ + labelsTr/, or a {LIST_FILE}")
    return Library(path, tuple(cases))


def library_from_pairs(pairs: Iterable[tuple[PathLike, PathLike]], root: PathLike) -> Library:
    """A library from explicit (image, labels) pairs; its index lives under ``root``."""
    root = Path(root)
    cases = [_case(Path(image), Path(labels), root) for image, labels in pairs]
    _require_unique(cases, root)
    if not cases:
        raise InputError("the library lists no case")
    return Library(root, tuple(cases))


def write_list_file(pairs: Iterable[tuple[PathLike, PathLike]], folder: PathLike) -> Path:
    """A library.json in ``folder`` listing these (image, labels) files by absolute path: a library of
    cases that live elsewhere (its index is kept beside the list)."""
    from ..common.files import write_json_atomic

    path = Path(folder) / LIST_FILE
    cases = [{"image": str(Path(i).resolve()), "labels": str(Path(lab).resolve())} for i, lab in pairs]
    write_json_atomic({"cases": cases}, path)
    return path


def find_cases(folder: Path) -> list[LibraryCase]:
    """Labelled cases under ``folder`` (recursively; hidden folders and the index skipped), sorted by id."""
    cases = []
    with RepeatedWarnings(log) as warnings:
        for labels in sorted(_image_files(folder)):
            base = label_base(labels)
            if base is None:
                continue
            image = _image_for(labels, base)
            if image is None:
                warnings.add("library: label files without an image, skipped", labels.name,
                             f"library: no image found for label file {labels}; skipped")
                continue
            cases.append(_case(image, labels, folder))
    return cases


def _image_files(folder: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and image_suffix(path) in READ_SUFFIXES:
                yield path


def label_base(path: Path) -> str | None:
    """The case name a label file belongs to, or None when the file does not look like labels."""
    suffix = image_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)]
    if suffix == SEG_NRRD:
        return stem
    if path.parent.name.lower() in LABEL_DIRS:
        return stem
    for token in LABEL_TOKENS:
        if stem.lower().endswith(token) and len(stem) > len(token):
            return stem[: len(stem) - len(token)]
    return None


def _image_for(labels: Path, base: str) -> Path | None:
    folders = [labels.parent]
    partner = LABEL_DIRS.get(labels.parent.name.lower())
    if partner is not None:
        folders.insert(0, labels.parent.parent / partner)
    for folder in folders:
        for token in IMAGE_TOKENS:
            for suffix in READ_SUFFIXES:
                candidate = folder / f"{base}{token}{suffix}"
                if suffix != SEG_NRRD and candidate != labels and candidate.is_file() and label_base(candidate) is None:
                    return candidate
    return None


LIST_EXAMPLE = '{"cases": [{"image": "a.nii.gz", "labels": "a_label.nii.gz"}]}'


def _from_list_file(path: Path) -> Library:
    """{"cases": [{"image": "a.nii.gz", "labels": "a_seg.nii.gz"}, ...]} or a list of [image, labels]."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or one_line(exc)
        raise InputError(f"cannot read library list {path}: {reason} (expected {LIST_EXAMPLE})") from None
    items = data.get("cases") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise InputError(f"library list {path}: expected a list of cases, as in {LIST_EXAMPLE}")
    pairs = [_list_entry(item, n, path) for n, item in enumerate(items)]
    root = path.parent
    resolved = [(root / Path(i).expanduser(), root / Path(lab).expanduser()) for i, lab in pairs]
    library = library_from_pairs(resolved, root)
    return Library(root, library.cases, path)


def _list_entry(item, n: int, path: Path) -> tuple[str, str]:
    """(image, labels) of entry ``n`` of a list file: {"image": ..., "labels": ...} or [image, labels]."""
    where = f"library list {path}, case {n + 1}"
    if isinstance(item, dict):
        missing = [key for key in ("image", "labels") if key not in item]
        if missing:
            raise InputError(f"{where}: the entry has no '{missing[0]}' (expected {LIST_EXAMPLE})")
        pair = (item["image"], item["labels"])
    elif isinstance(item, list) and len(item) == 2:
        pair = (item[0], item[1])
    else:
        raise InputError(f"{where}: expected {{\"image\": ..., \"labels\": ...}} or [image, labels], got "
                         f"{_brief(item)}")
    for key, value in zip(("image", "labels"), pair, strict=True):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: '{key}' must be a file path (a non-empty string), got {_brief(value)}")
        reason = _unusable_name(path.parent / Path(value).expanduser())
        if reason:
            raise InputError(f"{where}: '{key}' is not a usable file name ({reason}): {_brief(value)}")
    return pair


def _unusable_name(path: Path) -> str | None:
    """Why no file can have this name (a NUL, a lone surrogate, too long), or None; a missing file is fine here."""
    try:
        os.stat(path)
    except ValueError:
        return "not valid text"
    except OSError as exc:
        return exc.strerror if exc.errno == errno.ENAMETOOLONG else None
    return None


def _brief(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _case(image: Path, labels: Path, root: Path) -> LibraryCase:
    for p in (image, labels):
        try:
            exists = p.exists()
        except (OSError, ValueError) as exc:  # a name too long for the file system
            raise InputError(f"library case file {p} is not usable: {getattr(exc, 'strerror', None) or exc}") from None
        if not exists:
            raise InputError(f"library case file {p} does not exist")
    try:
        case_id = labels.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        case_id = labels.resolve().as_posix()
    return LibraryCase(case_id, image, labels)


def _require_unique(cases: Sequence[LibraryCase], root: Path) -> None:
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"library {root} lists the label file {dup[0]} more than once")


# ------------------------------------------------------------------------------ labelled slices


@dataclass
class CaseSlices:
    """The labelled slices of one case along one axis, model-ready, and one row per structure on them.

    The images are in the index's in-plane convention (library/orientation.py), not as the case stores
    them: a case stored flipped or transposed is embedded as the same picture; rows count the case's own
    slices along ``axis``."""

    images01: np.ndarray  # (n, H, W) float32 in [0, 1], one per slice with any structure, LPS order and sense
    rows: np.ndarray  # (m,) ROW_DTYPE
    num_slices: int
    axis: int


def labelled_slices(image: Volume, labels: LabelMap, plane: str, normalization: Normalization) -> CaseSlices:
    """Every slice along ``plane`` that holds a structure, normalised as the query is, in the index's
    in-plane convention (so that how the case is stored does not change what it is retrieved for)."""
    image.require_same_grid(labels.volume, "library labels")
    from ..io.slicing import slicing_axis
    from .orientation import canonical_slices

    axis = slicing_axis(image, plane)
    lab = np.moveaxis(labels.volume.array, axis, 0)
    n = lab.shape[0]
    values = sorted(set(np.unique(lab).tolist()) - {0})
    areas = {v: np.count_nonzero(lab == v, axis=(1, 2)) for v in values}
    keep = np.flatnonzero(np.any(lab > 0, axis=(1, 2)))
    emb_of = {int(s): e for e, s in enumerate(keep)}
    rows = []
    for v in values:
        present = np.flatnonzero(areas[v])
        first, last = int(present[0]), int(present[-1])
        for s in present:
            extent = 0.5 if last == first else (s - first) / (last - first)
            rows.append((emb_of[int(s)], v, s, s / max(1, n - 1), extent, areas[v][s]))
    norm = normalization.resolved(image.array)  # only the labelled slices are normalised, not a copy of the case
    images01 = np.empty((len(keep),) + lab.shape[1:], dtype=np.float32)
    norm.scale_into(np.moveaxis(image.array, axis, 0)[keep], norm.volume_bounds(image.array), images01)
    images01 = np.ascontiguousarray(canonical_slices(images01, image, axis, plane))
    return CaseSlices(images01, np.array(rows, dtype=ROW_DTYPE), n, axis)
