"""One labelled case added to a library (an accepted or corrected result): checked, placed, and indexed.

Reviewing a cohort ends with cases someone has vouched for; adding them to the library lets every later
query retrieve them. The CLI (`sam2fewshot library add`) and the Slicer worker call ``add_case``: the
embedding is the engine's own, run where the model is (Slicer's process holds none).

- Checked first, with the engine's reading rules: both files readable, the image segmentable
  (io/checks.py), the labels on the image's grid, at least one labelled voxel. Nothing is written
  before that.
- Placed by the library's own form. A folder library gets a new pair named after the case
  (``NAME_img`` + ``NAME_label`` and its JSON sidecar, ``NAME`` + ``NAME.seg.nrrd``, or the folder's
  ``imagesTr``/``labelsTr``), copied (default) or as symbolic links; a list file gets one more entry,
  the files listed where they are (default) or copied beside it. An existing case is never
  overwritten unless ``replace``.
- All or none: files appear whole (common/files.replacing); if anything fails, down to embedding the
  case, what was written is removed and what was replaced is put back. An index entry a failed add
  left is dropped by the next sync (the index is a cache).
- Indexed incrementally: every index already kept for the library whose features the caller brings is
  synced, which embeds only the new case and keeps every other shard as it is. A library without an
  index is left to `library build` (or the first retrieval), which embeds every case anyway.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..common.errors import InputError
from ..common.files import replacing, write_json_atomic
from ..common.names import file_name, folding_key
from ..common.progress import ProgressFn
from ..io.normalization import Normalization
from ..io.volume_io import SEG_NRRD, image_suffix, sidecar_path
from .cases import IMAGE_TOKENS, LABEL_DIRS, Library, LibraryCase, find_cases, label_base, open_library

log = logging.getLogger(__name__)

COPY, LINK = "copy", "link"
DETACHED = (".nhdr", ".mhd")  # a header whose voxels live in another file: not moved as one file


@dataclass(frozen=True)
class IndexUpdate:
    """One stored index of the library after the add: synced, or why it was left alone."""

    folder: Path
    plane: str
    features: str
    embedded: int = 0
    reused: int = 0
    seconds: float = 0.0
    left: str | None = None  # why it was not synced (its features are not the ones given)


@dataclass(frozen=True)
class AddResult:
    library: Path  # the folder, or the list file
    case: LibraryCase
    placement: str  # copy, link, or list (a list file's entry naming the files where they are)
    written: tuple[Path, ...]
    replaced: tuple[str, ...] = ()  # ids of the cases it replaced
    indexes: tuple[IndexUpdate, ...] = field(default_factory=tuple)


def add_case(library_path: str | Path, image: str | Path, labels: str | Path, name: str | None = None,
             placement: str | None = None, replace: bool = False,
             features: Sequence | Callable[[list[str]], Sequence] = (), index: bool = True,
             progress: ProgressFn | None = None) -> AddResult:
    """Add (``image``, ``labels``) to the library at ``library_path`` and bring its indexes up to date.

    ``placement``: 'copy' or 'link' (default: copy into a folder library, list a list file's files where
    they are). ``features``: LibraryFeatures, or a function giving them for the feature names of the
    library's indexes (index_feature_names), called once the case is checked; each stored index keyed by
    one of them is synced, the others are reported as left for `library build`; ``index`` False leaves
    every index alone. InputError, in one line and with nothing written, when the case is unusable or
    would overwrite another."""
    image, labels = Path(image).expanduser(), Path(labels).expanduser()
    if placement not in (None, COPY, LINK):
        raise InputError(f"unknown placement '{placement}': use {COPY} or {LINK}")
    check_case(image, labels)
    library, created = _open_or_new(Path(library_path).expanduser())
    name = file_name(name if name is not None else case_name(image))
    plan = _list_plan(library, image, labels, name, placement) if library.list_file else \
        _folder_plan(library, image, labels, name, placement or COPY)
    _refuse_overwrite(plan, replace)
    if callable(features):  # loaded only now: a bad case is refused before any model is
        features = features(index_feature_names(library)) if index else ()
    with _Undo() as undo:
        if created:
            undo.push(lambda: shutil.rmtree(library.root, ignore_errors=True))
        aside = [_move_aside(path, undo) for path in plan.displaced]
        written = tuple(_place(src, dest, plan.placement, undo) for src, dest in plan.files)
        if library.list_file is not None:
            _write_list_entry(library.list_file, plan, undo)
            written += (library.list_file,)
        reopened = open_library(library.list_file or library.root)
        case = _verify(library, reopened, plan)
        indexes = tuple(update_indexes(reopened, features, case, progress)) if index else ()
    for path in aside:
        path.unlink(missing_ok=True)
    return AddResult(library.list_file or library.root, case, plan.placement, written,
                     tuple(c.id for c in plan.replaces), indexes)


def check_case(image: Path, labels: Path) -> None:
    """InputError (one line, naming the file) unless the pair is a usable labelled case."""
    from ..io.checks import checked_image
    from ..io.volume_io import read_labels, read_volume

    for what, path in (("image", image), ("label file", labels)):
        if not path.exists():
            raise InputError(f"{what} {path} does not exist")
    volume = read_volume(image)
    checked_image(volume, str(image))
    found = read_labels(labels, reference=volume)  # on another grid: one line naming what differs
    if not np.any(found.volume.array):
        raise InputError(f"{labels} has no labelled voxel: there is nothing to add")


def case_name(image: Path) -> str:
    """The case name an image file suggests: case01_img.nii.gz, case01_0000.nii.gz, case01.nrrd -> case01."""
    stem = image.name[: len(image.name) - len(image_suffix(image))] if image_suffix(image) else image.name
    for token in IMAGE_TOKENS:
        if token and stem.lower().endswith(token) and len(stem) > len(token):
            return stem[: len(stem) - len(token)]
    return stem


def index_feature_names(library: Library) -> list[str]:
    """The feature extractors ('sam2', 'dinov2-small', ...) of the indexes kept for ``library``: what a
    caller loads to keep them all current."""
    from .index import EmbeddingIndex

    names = [index.config.features.split(":", 1)[0].removesuffix("-random")
             for index in EmbeddingIndex.existing(library.index_root())]
    return list(dict.fromkeys(names))


def update_indexes(library: Library, features: Sequence, case: LibraryCase | None = None,
                   progress: ProgressFn | None = None) -> list[IndexUpdate]:
    """Sync every index kept for ``library`` whose features key is one of ``features`` (only new or changed
    cases are embedded); InputError when ``case`` could not be embedded into one of them."""
    from .index import EmbeddingIndex
    from .sync import case_embedder

    by_key = {f.key: f for f in features}
    updates = []
    for index in EmbeddingIndex.existing(library.index_root()):
        config = index.config
        chosen = by_key.get(config.features)
        if chosen is None:
            updates.append(IndexUpdate(index.folder, config.plane, config.features,
                                       left="its features are not the model's loaded here"))
            continue
        embed = case_embedder(chosen, config.plane, normalization_of(config.normalization))
        _, stats = index.sync(library.cases, embed, progress)
        failed = [reason for cid, reason in stats.skipped if case is not None and cid == case.id]
        if failed:
            raise InputError(f"cannot embed {case.labels} ({config.plane} index): {failed[0]}")
        updates.append(IndexUpdate(index.folder, config.plane, config.features, stats.embedded, stats.reused,
                                   stats.seconds))
    return updates


def normalization_of(key: dict) -> Normalization:
    """The Normalization an index's config was keyed with (sync.normalization_key's inverse)."""
    window = key.get("window")
    return Normalization(str(key.get("mode", "auto")), tuple(window) if window else None,
                         tuple(key.get("percentiles", Normalization.percentiles)), bool(key.get("per_slice", False)))


# ------------------------------------------------------------------------------ where the files go


@dataclass
class _Plan:
    placement: str
    files: list[tuple[Path, Path]]  # (source, destination); empty when a list file names the files in place
    image: Path  # the case's image and labels as the library will name them
    labels: Path
    replaces: list[LibraryCase] = field(default_factory=list)
    displaced: list[Path] = field(default_factory=list)  # files moved aside (and deleted once all is done)
    entry: tuple[str, str] | None = None  # a list file's new entry


def _open_or_new(path: Path) -> tuple[Library, bool]:
    """The library, or an empty folder library (made when missing: it is the first case)."""
    if path.is_file() or (path.is_dir() and find_cases(path)) or (path / "library.json").is_file():
        return open_library(path), False
    if path.suffix.lower() == ".json":
        raise InputError(f"library list {path} does not exist: give a folder to start a library")
    if not path.parent.is_dir():
        raise InputError(f"cannot start a library in {path}: {path.parent} does not exist")
    created = not path.exists()
    path.mkdir(exist_ok=True)
    return Library(path, ()), created


def _folder_plan(library: Library, image: Path, labels: Path, name: str, placement: str) -> _Plan:
    dest_image, dest_labels = _destinations(library, name, image, labels)
    files = [(image, dest_image), (labels, dest_labels)] + _sidecar(labels, dest_labels)
    replaces = [c for c in library.cases if folding_key(label_base(c.labels) or "") == folding_key(name)]
    return _Plan(placement, files, dest_image, dest_labels, replaces)


def _list_plan(library: Library, image: Path, labels: Path, name: str, placement: str | None) -> _Plan:
    if placement == COPY:
        plan = _folder_plan(Library(library.root, ()), image, labels, name, COPY)
    else:  # listed where they are: a list file's --link
        plan = _Plan("list", [], image.resolve(), labels.resolve())
    plan.replaces = [c for c in library.cases if c.labels.resolve() == plan.labels.resolve()]
    plan.entry = (str(plan.image.resolve()), str(plan.labels.resolve()))
    return plan


def _destinations(library: Library, name: str, image: Path, labels: Path) -> tuple[Path, Path]:
    """The new pair's names, in the layout the library's cases already use."""
    isuf, lsuf = image_suffix(image), image_suffix(labels)
    for path, suffix in ((image, isuf), (labels, lsuf)):
        if suffix in DETACHED or not path.is_file():
            raise InputError(f"{path} is not a single-file volume (its voxels live elsewhere): convert it to "
                             ".nrrd or .nii.gz first")
    parents = {c.labels.parent for c in library.cases}
    if len(parents) == 1 and next(iter(parents)).name.lower() in LABEL_DIRS:  # imagesTr/ + labelsTr/
        label_dir = next(iter(parents))
        token = "_0000" if any(c.image.name.startswith(label_base(c.labels) + "_0000") for c in library.cases) else ""
        image_dir = label_dir.parent / LABEL_DIRS[label_dir.name.lower()]
        return image_dir / f"{name}{token}{isuf}", label_dir / f"{name}{lsuf}"
    if lsuf == SEG_NRRD:
        return library.root / f"{name}{isuf}", library.root / f"{name}{SEG_NRRD}"
    return library.root / f"{name}_img{isuf}", library.root / f"{name}_label{lsuf}"


def _sidecar(labels: Path, dest_labels: Path) -> list[tuple[Path, Path]]:
    """A plain label file's names and colours travel with it."""
    if image_suffix(labels) == SEG_NRRD:
        return []
    beside = sidecar_path(labels)
    source = beside if beside.is_file() else sidecar_path(labels.resolve())
    return [(source, sidecar_path(dest_labels))] if source.is_file() else []


def _refuse_overwrite(plan: _Plan, replace: bool) -> None:
    """One line when the add would overwrite a case or a file; with ``replace``, what goes aside."""
    taken = [dest for _, dest in plan.files if os.path.lexists(dest)]
    if not replace:
        if plan.replaces:
            raise InputError(f"the library already has the case {plan.replaces[0].id}: give another --name, or "
                             "--replace it")
        if taken:
            raise InputError(f"{taken[0]} already exists: give another --name, or --replace it")
        return
    old = [f for c in plan.replaces for f in c.files] if plan.placement != "list" else []
    sources = {src.resolve() for src, _ in plan.files}
    if sources & {Path(f).resolve() for f in old + taken}:
        raise InputError("--replace would remove the very files being added: add them from another folder")
    plan.displaced = list(dict.fromkeys(Path(f) for f in old + taken if os.path.lexists(f)))


# ------------------------------------------------------------------------------ writing, all or none


class _Undo:
    """Undo steps run newest first when the block fails (Ctrl-C included); forgotten when it succeeds."""

    def __init__(self):
        self.steps: list[Callable[[], object]] = []

    def push(self, step: Callable[[], object]) -> None:
        self.steps.append(step)

    def __enter__(self) -> _Undo:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None:
            for step in reversed(self.steps):
                try:
                    step()
                except OSError as exc:  # put back what can be; the error that failed the add is the one to see
                    log.warning("library add: could not undo a step: %s", exc)
        return False


def _move_aside(path: Path, undo: _Undo) -> Path:
    """``path`` renamed to a hidden name beside it, put back if the add fails."""
    fd, aside = tempfile.mkstemp(prefix=f".{path.name[:60]}.", suffix=".replaced", dir=path.parent)
    os.close(fd)
    os.replace(path, aside)
    undo.push(lambda: os.replace(aside, path))
    return Path(aside)


def _place(source: Path, dest: Path, placement: str, undo: _Undo) -> Path:
    """``source`` copied to ``dest`` or linked there (an absolute symbolic link), whole or not at all."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if placement == LINK:  # not through replacing(): it would give the link's target new permissions
        tmp = dest.with_name(f".{dest.name[:80]}.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(source.resolve())
        os.replace(tmp, dest)
    else:
        with replacing(dest, suffix=image_suffix(dest)) as tmp:
            shutil.copyfile(source, tmp)
    undo.push(lambda: dest.unlink(missing_ok=True))
    return dest


def _write_list_entry(list_file: Path, plan: _Plan, undo: _Undo) -> None:
    """The list with the new entry (a replaced case's entry swapped in place), written atomically; the
    other entries, and keys we do not know, as they were."""
    before = list_file.read_bytes()
    data = json.loads(before)
    items = data.get("cases") if isinstance(data, dict) else data
    entry = dict(zip(("image", "labels"), plan.entry, strict=True))
    root, gone = list_file.parent, {c.labels.resolve() for c in plan.replaces}
    kept = [item for item in items if _listed_labels(item, root) not in gone]
    kept.append(entry if not kept or isinstance(kept[0], dict) else list(plan.entry))
    items[:] = kept
    write_json_atomic(data, list_file)
    undo.push(lambda: _restore(list_file, before))


def _listed_labels(item, root: Path) -> Path:
    labels = item["labels"] if isinstance(item, dict) else item[1]
    return (root / Path(labels).expanduser()).resolve()


def _restore(path: Path, content: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(content)


def _verify(before: Library, after: Library, plan: _Plan) -> LibraryCase:
    """The new case, as the library now reads it; InputError when the library reads the new files (or
    any case it had) otherwise than meant."""
    want = plan.labels.resolve()
    found = [c for c in after.cases if c.labels.resolve() == want]
    if not found or found[0].image.resolve() != plan.image.resolve():
        raise InputError(f"the library would not read {plan.labels.name} with {plan.image.name} as one case: "
                         "give another --name")
    gone = {c.id for c in plan.replaces}
    pairs = {(c.id, c.image.resolve()) for c in after.cases}
    changed = [c.id for c in before.cases if c.id not in gone and (c.id, c.image.resolve()) not in pairs]
    if changed:
        raise InputError(f"adding the case would change how the library reads {changed[0]}: give another --name")
    return found[0]
