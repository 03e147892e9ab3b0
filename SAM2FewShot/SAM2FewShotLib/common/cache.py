"""The per-user cache folder: weights, example data, library indexes, adapters, scratch files.

Outside any Slicer or Python install, so an upgrade never deletes what was downloaded; movable with
$SAM2FEWSHOT_CACHE (the panel sets it from its settings).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
