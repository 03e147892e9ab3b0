"""Small JSON files written atomically; imports nothing heavy, so the Slicer panel can use it."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic_write import replacing


def write_json_atomic(data: dict, path) -> None:
    """Write JSON next to its final place, then rename: a reader never sees half a report."""
    with replacing(Path(path)) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1)
