"""Image headers that name their data elsewhere: the data must lie beside the header, as a regular file.

A detached NRRD header (``.nhdr``, or a ``.nrrd`` with a ``data file:`` field) and a MetaImage
header (``.mhd``/``.mha`` with ``ElementDataFile``) may name any file: ``../../etc/passwd``,
``/proc/self/environ``, a device or a FIFO would be read (or block) and segmented as if it were an
image. Before ITK reads such a header, its data files are listed from the header text alone (no
data is read) and each must resolve, symlinks followed, to a regular file in the header's folder or
below; otherwise one line names the header and the data file. The single, LIST and printf-style
pattern forms of both formats are understood.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from ..common.errors import InputError

HEADER_BYTES = 1 << 20  # a header (a LIST of thousands of slice files included) is far smaller
MAX_PATTERN_FILES = 100_000  # a printf pattern naming more files is refused, not expanded
_NRRD_SUFFIXES = (".nrrd", ".nhdr")
_META_SUFFIXES = (".mha", ".mhd")
_NRRD_FIELD = re.compile(r"^\s*data\s?file\s*:(?!=)\s*(.*?)\s*$", re.IGNORECASE)  # not a "key:=value" pair
_META_FIELD = re.compile(r"^\s*ElementDataFile\s*=\s*(.*?)\s*$")
_PRINTF = re.compile(r"%[-+ 0#]*\d*[diuxX]")


class _TooManyFiles(Exception):
    """A printf pattern that names more data files than any volume has slices."""


def check_data_files(header: Path) -> None:
    """InputError unless every data file ``header`` names lies beside it and is a regular file.

    Formats that keep their voxels in the header's own file (NIfTI, an attached NRRD, a LOCAL
    MetaImage) pass at once. Only regular header files are opened: a FIFO would block here, and
    what is not a regular file is for the reader to refuse.
    """
    for name in data_file_names(header):
        _check_one(header, name)


def data_file_names(header: Path) -> list[str]:
    """The data files ``header`` names, as written (relative to its folder); none for a format that
    keeps its voxels in its own file, or a header that is not a regular file."""
    header = Path(header)
    suffix = _suffix(header)
    if suffix not in _NRRD_SUFFIXES + _META_SUFFIXES or not _is_regular(header):
        return []
    text = _header_text(header, nrrd=suffix in _NRRD_SUFFIXES)
    try:
        return _nrrd_data_files(text) if suffix in _NRRD_SUFFIXES else _meta_data_files(text)
    except _TooManyFiles as exc:
        raise InputError(f"cannot read {header}: {exc}") from None


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _header_text(path: Path, nrrd: bool) -> str:
    """The header's text: an NRRD header ends at its first blank line (the data of an attached file follows)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError:
        return ""  # unreadable: the reader says why in its own line
    if nrrd:
        raw = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    elif b"ElementDataFile" in raw:  # MetaImage: the field is the header's last; binary data may follow its line
        start = raw.index(b"ElementDataFile")
        end = raw.find(b"\n", start)
        tail = raw[end:] if end >= 0 else b""
        if not re.match(rb"\s*ElementDataFile\s*=\s*LIST", raw[start:]):
            tail = b""  # only a LIST names more files on the lines after it
        raw = raw[:end if end >= 0 else len(raw)] + tail
    return raw.decode("latin-1")


def _nrrd_data_files(text: str) -> list[str]:
    """Data file names of an NRRD header: one name, ``LIST`` (names on the lines that follow), or a
    printf pattern with first, last and step (teem's three forms)."""
    lines = text.splitlines()
    for n, line in enumerate(lines):
        match = _NRRD_FIELD.match(line)
        if match and not line.lstrip().startswith("#"):
            return _named_files(match.group(1), lines[n + 1:])
    return []


def _meta_data_files(text: str) -> list[str]:
    """Data file names of a MetaImage header (``LOCAL``: the data follow the header in its own file)."""
    lines = text.splitlines()
    for n, line in enumerate(lines):
        match = _META_FIELD.match(line)
        if match:
            value = match.group(1)
            return [] if value.upper() == "LOCAL" else _named_files(value, lines[n + 1:])
    return []


def _named_files(value: str, following: list[str]) -> list[str]:
    words = value.split()
    if not words:
        return []
    if words[0].upper() == "LIST":
        return [name for line in following for name in [line.strip()] if name and not name.startswith("#")]
    if _PRINTF.search(words[0]) and len(words) >= 3 and all(_is_number(w) for w in words[1:4]):
        return list(_pattern_files(words[0], words[1:4]))
    return [value]


def _is_number(word: str) -> bool:
    return bool(re.fullmatch(r"[-+]?\d+", word))


def _pattern_files(pattern: str, numbers: list[str]) -> Iterator[str]:
    first, last = int(numbers[0]), int(numbers[1])
    step = int(numbers[2]) if len(numbers) > 2 else 1
    if step == 0 or (last - first) * step < 0:
        step = 1 if last >= first else -1
    count = (last - first) // step + 1
    if count > MAX_PATTERN_FILES:
        raise _TooManyFiles(f"its data file pattern {pattern} names {count} files (more than {MAX_PATTERN_FILES})")
    for index in range(first, last + (1 if step > 0 else -1), step):
        try:
            yield pattern % index
        except (TypeError, ValueError):
            yield pattern
            return


def _check_one(header: Path, name: str) -> None:
    folder = header.parent
    try:
        target = (folder / name).resolve()
        inside = target.is_relative_to(folder.resolve())
    except (OSError, ValueError, RuntimeError):  # a loop of links, a NUL byte
        raise InputError(f"cannot read {header}: its data file {name} is not a usable path") from None
    if not inside:
        raise InputError(f"cannot read {header}: its data file {name} lies outside the header's folder "
                         "(data files must be in the header's folder or below)")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        raise InputError(f"cannot read {header}: its data file {name} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read {header}: its data file {name}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"cannot read {header}: its data file {name} is not a regular file")
