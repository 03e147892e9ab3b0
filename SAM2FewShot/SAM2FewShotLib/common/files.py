"""Files that appear whole or not at all (written beside their place, then renamed onto it).

Label maps, reports, index shards, weights and adapters all go through ``replacing``, so a reader
(or a crash, or a cancel that kills the process) never meets half a file. Imports nothing heavy,
so the Slicer panel can use it before first-use setup.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path, suffix: str = "") -> Iterator[Path]:
    """A fresh temporary path in ``path``'s folder: renamed onto ``path`` when the block succeeds,
    removed when it fails (``path`` is then untouched). ``suffix`` ends the temporary name, for
    writers that choose the format by extension (ITK)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=path.resolve().parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def writable_folder(folder) -> bool:
    """True when files can be written in ``folder``, or it can be made (nothing is created here)."""
    existing = Path(folder).resolve()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def sweep_stale_temporaries(path) -> list[Path]:
    """Remove the temporaries a killed run left beside ``path`` (``replacing``'s, whose process is gone);
    a live writer's are left alone. Returns what was removed."""
    path = Path(path)
    removed = []
    folder = path.resolve().parent
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f".{glob.escape(path.name)}.*.tmp*"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:  # e.g. Windows without such a process
        return False
    return True


def write_json_atomic(data: dict, path) -> None:
    """JSON written beside its final place, then renamed: a reader never sees half a report."""
    with replacing(Path(path)) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1)

