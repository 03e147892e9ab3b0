"""Files that appear whole or not at all (written beside their place, then renamed onto it).

Label maps, reports, index shards, weights and adapters all go through ``replacing``, so a reader
(or a crash, or a cancel that kills the process) never meets half a file. Imports nothing heavy,
so the Slicer panel can use it before first-use setup.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .paths import name_bytes, name_limit

# Bytes a temporary adds to its target's name: ".", ".PID.", mkstemp's 8 characters, ".tmp", a suffix
# up to ".seg.nrrd". A name too long for that is represented by a digest (``temporary_stem``).
TEMPORARY_ROOM = 40


@contextlib.contextmanager
def replacing(path, suffix: str = "") -> Iterator[Path]:
    """A fresh temporary path in ``path``'s folder: renamed onto ``path`` when the block succeeds,
    removed when it fails (``path`` is then untouched). ``suffix`` ends the temporary name, for
    writers that choose the format by extension (ITK).

    A symlink is written through: the temporary is made beside its target and renamed onto the
    target (never across file systems, and the link stays a link)."""
    target = Path(path).resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{temporary_stem(target)}.{os.getpid()}.", suffix=f".tmp{suffix}",
                               dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def final_path(path) -> Path:
    """Where a write to ``path`` lands: a symlink's target, else ``path`` itself (as given)."""
    path = Path(path)
    try:
        return path.resolve() if path.is_symlink() else path
    except OSError:  # a name too long to look at: the writer says so
        return path


def temporary_stem(path) -> str:
    """What a temporary of ``path`` is named after: its name, or a short digest of a name so long that
    the temporary would pass the folder's name limit (any name that fits has a temporary that fits)."""
    path = Path(path)
    if name_bytes(path) + TEMPORARY_ROOM <= name_limit(path.parent):
        return path.name
    return "~" + hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]


def temporary_name_bytes(path) -> int:
    """Bytes in the longest name of a temporary ``replacing`` makes for ``path``."""
    return len(os.fsencode(temporary_stem(path))) + TEMPORARY_ROOM


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
    path = Path(path).resolve()
    removed = []
    if not path.parent.is_dir():
        return removed
    stem = temporary_stem(path)
    pattern = re.compile(rf"\.{re.escape(stem)}\.(\d+)\.\w+\.tmp.*", re.ASCII)  # not another name's
    for tmp in path.parent.glob(f".{glob.escape(stem)}.*.tmp*"):
        match = pattern.fullmatch(tmp.name)
        if match and not _alive(int(match.group(1))):
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

