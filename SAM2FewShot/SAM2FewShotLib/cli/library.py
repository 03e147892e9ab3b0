"""`sam2fewshot library build|add|info DIR`: bring a support library's embedding index up to date, add one
labelled case to it, or describe it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..common.choices import LIBRARY_FEATURES
from ..common.errors import InputError
from ..methods.retrieval import RetrievalParams
from .options import add_command, add_console_args, add_model_args, add_normalization_args, model_options

PLANE_CHOICES = ("auto", "axial", "coronal", "sagittal", "all")


def add_library_parser(subparsers) -> argparse.ArgumentParser:
    """Register `library build`, `library add` and `library info` on the main parser's subparsers."""
    p = add_command(subparsers, "library", "build or inspect the embedding index of a labelled support library",
                    description="A library is a folder of labelled cases (X_img + X_label, X + X.seg.nrrd, "
                                "imagesTr/ + labelsTr/, ...) or a library.json listing them. Its index is kept in "
                                "DIR/.sam2fewshot_index (the user cache when DIR is read-only).")
    actions = p.add_subparsers(dest="library_action", required=True, metavar="ACTION")
    build = add_command(actions, "build", "embed every labelled slice (only new or changed cases)")
    build.add_argument("library", type=Path, metavar="DIR", help="library folder or list file")
    build.add_argument("--features", default=RetrievalParams.features, choices=LIBRARY_FEATURES,
                       help="slice descriptors; sam2: the SAM2 encoder, whose features propagation reuses")
    build.add_argument("--plane", default="auto", choices=PLANE_CHOICES,
                       help="slicing plane of the index; auto: every plane a case was acquired in, the planes "
                            "segment --axis auto cuts queries of the same kinds in; all: the three")
    add_normalization_args(build.add_argument_group("frames (as segment takes them: an index serves one setting)"))
    add_console_args(build)
    add_model_args(build)
    _add_add_parser(actions)
    info = add_command(actions, "info", "the library's cases, structures and indexes (nothing is computed)")
    info.add_argument("library", type=Path, metavar="DIR", help="library folder or list file")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def run_library(args: argparse.Namespace) -> int:
    from ..library.cases import open_library

    if args.library_action == "add":  # the library may not exist yet: its first case starts it
        return run_add(args)
    library = open_library(args.library)
    if args.library_action == "build":
        return _build(args, library)
    if args.library_action == "info":
        summary = library_summary(library)
        print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
        return 0
    raise InputError(f"unknown library action {args.library_action}")


def _build(args: argparse.Namespace, library) -> int:
    from ..common.cache import require_cache
    from ..io.normalization import Normalization
    from ..library.sync import PLANES, acquisition_planes, sync_library
    from .console import ConsoleProgress

    normalization = Normalization.parse(args.normalization, per_slice=args.per_slice_normalization)
    require_cache()  # the model's weights, and the index when the library's folder is read-only
    planes = {"all": PLANES, "auto": None}.get(args.plane, (args.plane,)) or acquisition_planes(library)
    features = features_from_args(args)
    for plane in planes:
        progress = ConsoleProgress(enabled=not args.quiet)
        try:
            index, data, stats = sync_library(library, features, plane, normalization, progress)
        finally:
            progress.close()
        print(f"{plane}: {len(library)} cases, {len(data)} slice embeddings ({len(data.rows)} slice-structure rows) "
              f"in {index.folder}: {stats.embedded} embedded, {stats.reused} reused, {stats.removed} removed, "
              f"{stats.recovered} recovered, {index.size_bytes() / 1e6:.2f} MB, {stats.seconds:.1f} s")
        for case_id, reason in stats.skipped:
            print(f"  skipped {case_id}: {reason}")
    return 0


def _add_add_parser(actions) -> None:
    add = add_command(actions, "add", "add one labelled case (e.g. an accepted or corrected result) and embed "
                      "it into the library's existing indexes",
                      description="Checks the case (readable, labels on the image's grid, a labelled voxel), puts "
                                  "it into the library and embeds only it into every index the library already "
                                  "has (the other cases' embeddings are kept). A library without an index is left "
                                  "to 'library build' or the first retrieval run, which embed every case anyway. "
                                  "If anything fails, nothing is changed. The model options name the model the "
                                  "indexes were built with (an index of other features is reported, not updated).")
    add.add_argument("library", type=Path, metavar="LIBRARY",
                     help="library folder (made if missing: the first case starts it) or list file")
    add.add_argument("image", type=Path, metavar="IMAGE", help="the case's image")
    add.add_argument("labels", type=Path, metavar="LABELS",
                     help="its label map (.seg.nrrd, or a label volume with its .json sidecar of names and colours)")
    add.add_argument("--name", help="the case's name in a folder library (its files become NAME_img + NAME_label, "
                                    "NAME + NAME.seg.nrrd, or imagesTr/ + labelsTr/ as the library's cases are; "
                                    "default: from IMAGE's file name)")
    how = add.add_mutually_exclusive_group()
    how.add_argument("--copy", dest="placement", action="store_const", const="copy",
                     help="copy the files into the library (the default for a folder library; for a list file: "
                          "into its folder, listed by path)")
    how.add_argument("--link", dest="placement", action="store_const", const="link",
                     help="do not copy: symbolic links in a folder library, the files' own paths in a list file "
                          "(the default there); the library then follows any later change to the files")
    add.add_argument("--replace", action="store_true",
                     help="replace a case of the same name (or list entry of the same label file) instead of "
                          "refusing")
    add.add_argument("--no-index", action="store_true",
                     help="only add the files; the next 'library build' or retrieval run embeds the case")
    add_console_args(add)
    add_model_args(add)


def run_add(args: argparse.Namespace) -> int:
    """`library add`: the engine's add_case; the features of the library's indexes are loaded only once the
    case is checked, and only when some index is there to be kept current."""
    from ..library.add import add_case
    from .console import ConsoleProgress

    def load_features(names: list[str]) -> list:
        if not names:
            return []
        from ..common.cache import require_cache

        require_cache()  # the model's weights
        return [features_from_args(argparse.Namespace(**{**vars(args), "features": n})) for n in names]

    progress = ConsoleProgress(enabled=not args.quiet)
    try:
        result = add_case(args.library, args.image, args.labels, name=args.name, placement=args.placement,
                          replace=args.replace, features=load_features, index=not args.no_index,
                          progress=progress)
    finally:
        progress.close()
    print(format_added(result, args.no_index))
    return 0


def format_added(result, no_index: bool = False) -> str:
    """What the add did, in a few lines: the case and its files, then each index."""
    how = {"copy": "copied", "link": "linked", "list": "listed"}[result.placement]
    lines = [f"added {result.case.id} to {result.library} ({how}"
             + (f"; replaced {', '.join(result.replaced)}" if result.replaced else "") + ")"]
    lines += [f"  {path}" for path in result.written]
    for ix in result.indexes:
        if ix.left:
            lines.append(f"{ix.plane} index {ix.folder} not updated ({ix.left}): run 'sam2fewshot library build' "
                         f"with its model")
        else:
            lines.append(f"{ix.plane} index {ix.folder}: {ix.embedded} embedded, {ix.reused} reused, "
                         f"{ix.seconds:.1f} s")
    if not result.indexes:
        lines.append("no index updated (--no-index)" if no_index else
                     "no index yet: 'sam2fewshot library build' (or the first retrieval run) embeds every case")
    return "\n".join(lines)


def features_from_args(args: argparse.Namespace):
    """The library features the arguments ask for; SAM2 is loaded only for 'sam2'."""
    from ..library.sync import library_features
    from ..sam2.build import load_model
    from ..sam2.devices import resolve_device

    predictor = load_model(model_options(args))[0] if args.features == "sam2" else None
    device = predictor.device if predictor is not None else resolve_device(args.device)
    return library_features(args.features, predictor, device, offline=args.offline, random_weights=args.random_weights,
                            seed=args.seed, progress=not getattr(args, "quiet", False))


def library_summary(library) -> dict:
    """Cases and every stored index of the library (beside it and in the user cache)."""
    from ..library.index import EmbeddingIndex

    indexes = []
    for root in dict.fromkeys(library.index_locations()):
        indexes += [index.describe(library.cases) for index in EmbeddingIndex.existing(root)]
    return {"library": str(library.list_file or library.root), "cases": len(library),
            "case_files": [{"id": c.id, "image": str(c.image), "labels": str(c.labels)} for c in library.cases],
            "indexes": indexes}


def format_summary(summary: dict) -> str:
    lines = [f"library {summary['library']}: {summary['cases']} cases"]
    if not summary["indexes"]:
        lines.append("no index yet: run 'sam2fewshot library build DIR'")
    for ix in summary["indexes"]:
        cfg = ix["config"]
        state = ", ".join(f"{ix[k]} {k}" for k in ("current", "changed", "new", "removed") if ix[k])
        lines.append(f"index {ix['folder']}")
        lines.append(f"  features {cfg['features']}, plane {cfg['plane']}, "
                     f"normalization {cfg['normalization']['mode']}")
        lines.append(f"  {ix['cases_indexed']} cases indexed ({state or 'empty'}), "
                     f"{ix['embeddings']} slice embeddings, "
                     f"{ix['rows']} slice-structure rows, {ix['size_bytes'] / 1e6:.2f} MB")
        for s in ix["structures"]:
            lines.append(f"  label {s['value']:>3}  {s['name']}  (in {s['cases']} cases)")
    return "\n".join(lines)
