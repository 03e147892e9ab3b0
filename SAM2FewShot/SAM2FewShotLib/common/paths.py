"""Paths the user gave, checked before any work, each problem refused in one line with its real reason.

ITK aborts the whole process, with no message, on a path that is not valid UTF-8; it blocks for ever
opening a FIFO; and it reports a file it may not read as missing. A name longer than the file system
allows fails only when the file is created, after the run. So every front end's inputs and outputs
pass through here first (run/runner.check_request, run/outputs.check_outputs). Imports nothing heavy.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import InputError

NAME_MAX_FALLBACK = 255  # bytes in one file name, where the system cannot tell (the common limit)
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


SHOWN_CHARS = 200  # a longer path is cut in messages (a 10 MB "path" from a protocol line stays one line)


def shown(path) -> str:
    """The path as text that prints anywhere: bytes that are not UTF-8 as \\xNN, as a shell shows them;
    cut after SHOWN_CHARS characters."""
    text = os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def check_path_text(path, what: str) -> None:
    """InputError when ``path`` is not valid UTF-8 (SimpleITK aborts the process on it) or holds a NUL."""
    text = os.fspath(path)
    text = os.fsdecode(text) if isinstance(text, bytes) else text
    if "\0" in text:
        raise InputError(f"{what} {shown(text)!r} holds a NUL character: it cannot be a file name")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} {shown(text)} is not valid UTF-8, which SimpleITK cannot open: rename it "
                         "(or the folder it is in)") from None


def check_readable(path, what: str) -> None:
    """InputError unless ``path`` is a regular file or a folder this process may read, naming the reason:
    missing, permission denied, or not a regular file. Looked at with stat(), so a FIFO is never opened."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{what} {shown(path)} does not exist") from None
    except PermissionError:
        raise InputError(f"{what} {shown(path)} cannot be read: permission denied (on it or a folder above it)") \
            from None
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte, a symlink loop
        raise InputError(f"{what} {shown(path)} is not a usable file name: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        mode = os.R_OK | os.X_OK
    elif stat.S_ISREG(info.st_mode):
        mode = os.R_OK
    else:
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "a special file")
        raise InputError(f"{what} {shown(path)} is not a regular file but {kind}: give a file (or a folder)")
    if not os.access(path, mode):
        raise InputError(f"{what} {shown(path)} cannot be read: permission denied")


def name_limit(folder) -> int:
    """The most bytes one file name may have in ``folder`` (its file system's NAME_MAX), else 255."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder yet, or no pathconf (Windows)
        return NAME_MAX_FALLBACK
    return limit if limit and limit > 0 else NAME_MAX_FALLBACK


def name_bytes(path) -> int:
    """Bytes of the file name (the last part of ``path``) as the file system stores it."""
    return len(os.fsencode(Path(path).name))

