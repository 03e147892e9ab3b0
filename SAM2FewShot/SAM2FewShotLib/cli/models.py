"""`sam2fewshot models`: list the registry, download, verify and import weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..common.cache import CACHE_ENV, cache_dir, require_cache
from ..common.errors import ModelError
from ..sam2 import models, weights
from .options import add_command

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1


def add_models_parser(subparsers) -> argparse.ArgumentParser:
    """Register `models` and its actions on the main parser's subparsers."""
    p = add_command(subparsers, "models", "list, download, verify or import model weights",
                    description=f"Model weights are cached in {cache_dir()} (set {CACHE_ENV} to move it).")
    actions = p.add_subparsers(dest="models_action", required=True, metavar="ACTION")
    add_command(actions, "list", "the registered models, the default marked, and whether their weights are cached")
    dl = add_command(actions, "download", "fetch a model's weights into the cache and check their SHA-256")
    dl.add_argument("name", metavar="NAME", help="registered model name (see 'models list')")
    dl.add_argument("--offline", action="store_true", help="never use the network: only check the cache")
    ver = add_command(actions, "verify", "re-check the SHA-256 of cached weights (works offline)")
    ver.add_argument("names", nargs="*", metavar="NAME", help="models to check (default: every cached one)")
    imp = add_command(actions, "import", "copy a local weights file into the cache (offline sites)")
    imp.add_argument("name", metavar="NAME", help="registered model name the file belongs to")
    imp.add_argument("file", type=Path, metavar="FILE", help="the checkpoint file, e.g. sam2.1_hiera_tiny.pt")
    return p


def run_models(args: argparse.Namespace) -> int:
    """Run one `models` action; ModelError for anything the user must fix (the CLI prints it)."""
    action = args.models_action
    if action == "list":
        print(format_table(model_rows()))
        print("* the default (--model)")
        return EXIT_OK
    if action in ("download", "import"):
        require_cache()  # where the weights go: a bad $SAM2FEWSHOT_CACHE is one line, before any transfer
    if action == "download":
        path = weights.download(args.name, offline=args.offline, progress=not getattr(args, "quiet", False))
        print(f"{args.name}: {path} (SHA-256 {weights.known_sha256(args.name)} verified)")
        return EXIT_OK
    if action == "verify":
        return _verify(args.names)
    if action == "import":
        path = weights.import_checkpoint(args.name, args.file)
        print(f"{args.name}: imported {args.file} as {path}")
        return EXIT_OK
    raise ModelError(f"unknown models action {action}")


def model_rows() -> list[list[str]]:
    rows = [["NAME", "FAMILY", "INPUT", "CACHED", "SOURCE"]]
    for spec in models.REGISTRY.values():
        name = f"{spec.name}*" if spec.name == models.DEFAULT_MODEL else spec.name
        rows.append([name, spec.family, f"{spec.image_size} px", "yes" if weights.is_cached(spec.name) else "no",
                     f"hf:{spec.hf_repo}/{spec.hf_file}"])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _verify(names: list[str]) -> int:
    """One line per model; exit 1 when any cached file fails its check."""
    for name in names:
        models.get_spec(name)  # unknown names fail before any hashing
    names = names or [n for n in models.REGISTRY if weights.is_cached(n)]
    if not names:
        print(f"no cached weights in {weights.weights_dir()}")
        return EXIT_OK
    failed = 0
    for name in names:
        try:
            sha = weights.verify_cached(name)
        except ModelError as exc:
            failed += 1
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
        else:
            print(f"{name}: ok (SHA-256 {sha})")
    return EXIT_VERIFY_FAILED if failed else EXIT_OK
