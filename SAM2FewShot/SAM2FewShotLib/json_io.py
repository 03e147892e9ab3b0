"""Small JSON files written atomically; imports nothing heavy, so the Slicer panel can use it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(data: dict, path) -> None:
    """Write JSON next to its final place, then rename: a reader never sees half a report."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600: give the report the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
