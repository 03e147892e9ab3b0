"""Names taken from data (CSV ids, case and segment names) as file names: the one way they become one.

A name from a CSV or a header is text, not a path: ``../x``, ``/etc/x``, ``CON`` or a 300-byte id
must not write outside the output folder, fail on another system, or collide with the folder's own
files. Safe names map to themselves (existing cohorts resume unchanged); anything else is escaped
(``%2F`` for ``/``: still readable, never a separator) and an over-long name is shortened with a
digest of the whole, so two long names stay apart. Collisions that escaping cannot rule out (``Case_A``
and ``case_a`` on a case-insensitive file system, an id whose outputs are another's) are refused by
``check_distinct`` before any work.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping

from .errors import InputError

# Longest name taken from data, in UTF-8 bytes: leaves room, within the usual 255-byte limit of a file
# name, for the longest suffix an output adds to it (_report.json, .seg.nrrd) and for the hidden
# temporary name it is written under first.
MAX_NAME_BYTES = 120
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|%]')
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)(\..*)?$", re.IGNORECASE)


def file_name(name: str) -> str:
    """``name`` as a file name: itself when it is already one on every common file system."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"an empty name cannot name a file ({name!r})")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the name {name!r} is not valid text (undecodable bytes): it cannot name a file") from None
    safe = _UNSAFE.sub(_escape, name) if _needs_escape(name) else name
    if safe.startswith(".") or safe.startswith(" "):  # hidden (our temporaries start with '.'), '.' or '..'
        safe = _escape_char(safe[0]) + safe[1:]
    if safe.endswith(".") or safe.endswith(" "):  # Windows drops them: 'a.' would be 'a'
        safe = safe[:-1] + _escape_char(safe[-1])
    if _RESERVED.match(safe):
        safe = _escape_char(safe[0]) + safe[1:]
    if len(safe.encode("utf-8")) > MAX_NAME_BYTES:
        safe = _shortened(safe, name)
    return safe


def _needs_escape(name: str) -> bool:
    """'%' is escaped only in names that need escaping anyway, so a safe name with a '%' keeps it."""
    return bool(re.search(r'[\x00-\x1f\x7f/\\:*?"<>|]', name))


def _escape(match: re.Match) -> str:
    return _escape_char(match.group(0))


def _escape_char(char: str) -> str:
    return "".join(f"%{b:02X}" for b in char.encode("utf-8"))


def _shortened(safe: str, name: str) -> str:
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    head = safe.encode("utf-8")[: MAX_NAME_BYTES - len(digest) - 1].decode("utf-8", "ignore").rstrip(". ")
    return f"{head}~{digest}"


def folding_key(file: str) -> str:
    """What two names have in common on a case-insensitive, normalising file system (macOS, Windows)."""
    return unicodedata.normalize("NFC", file).casefold()


def check_distinct(outputs: Mapping[str, Iterable[str]], reserved: Iterable[str] = (), what: str = "case") -> None:
    """Refuse, in one line naming both, two owners (e.g. case ids) whose files would be one file, or an
    owner whose file would be one of the folder's own (``reserved``: manifest.json, ...)."""
    owners: dict[str, str] = {folding_key(r): f"the folder's own {r}" for r in reserved}
    for owner, files in outputs.items():
        for file in files:
            key = folding_key(file)
            other = owners.get(key)
            if other is not None and other != f"{what} {owner}":
                raise InputError(f"{what} {owner} would write {file}, which is also {_owner_words(other)}: "
                                 f"give each {what} an id of its own")
            owners[key] = f"{what} {owner}"


def _owner_words(owner: str) -> str:
    return owner if owner.startswith("the folder's own") else f"written by {owner}"
