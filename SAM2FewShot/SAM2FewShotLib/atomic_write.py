"""Files that appear whole or not at all: written beside their place, then renamed onto it.

Reports, index shards, weights and adapters all go through here, so a reader (or a crash, or a
cancel that kills the process) never meets half a file. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path) -> Iterator[Path]:
    """A fresh temporary path in ``path``'s folder: renamed onto ``path`` when the block succeeds,
    removed when it fails (``path`` is then untouched)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
