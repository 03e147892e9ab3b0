"""The per-user cache folder: weights, example data, library indexes, adapters, scratch files.

Outside any Slicer or Python install, so an upgrade never deletes what was downloaded; movable with
$SAM2FEWSHOT_CACHE (the panel sets it from its settings).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import InputError

CACHE_ENV = "SAM2FEWSHOT_CACHE"


def cache_dir() -> Path:
    """$SAM2FEWSHOT_CACHE, else the platform's per-user cache folder: outside any install folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "sam2fewshot" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sam2fewshot"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sam2fewshot"


def require_cache() -> Path:
    """The cache folder, once it is a folder this user can write, or can be made as one.

    Called where a command first needs to write there (weights, example data, support features,
    library indexes): a ``$SAM2FEWSHOT_CACHE`` that names a file or a read-only folder is then one
    line that names the setting, not a traceback in the middle of a run.
    """
    root = cache_dir()
    existing = root
    while not _exists(existing) and existing.parent != existing:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return root
    if not existing.is_dir():
        problem = "is not a folder" if existing == root else f"cannot be made: {existing} is not a folder"
    else:
        problem = "is not writable" if existing == root else f"cannot be made: {existing} is not writable"
    if os.environ.get(CACHE_ENV):
        raise InputError(f"{CACHE_ENV}={os.environ[CACHE_ENV]} {problem}: point it to a folder you can write")
    raise InputError(f"the cache folder {root} {problem}: set {CACHE_ENV} to a folder you can write")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a folder above it that may not be read
        return False
