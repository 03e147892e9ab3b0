"""What a cohort's cases were conditioned on: the support cases, or the library's cases, as files.

The options digest keeps which library a cohort uses (its identity) but not what it holds: a library
(or a set of supports) that gained accepted cases since a case ran is "grown", and the cases not yet
reviewed are done again with it, where any other change is "other options" (refused unless --force).
Each record keeps the digest of what it was conditioned on; the manifest keeps each digest's members
once, so the next run can tell a grown set from a changed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..common.digests import json_digest
from ..run.request import Request


@dataclass(frozen=True)
class Conditioning:
    kind: str  # "library", "support set", or "" (prompts only: nothing that can grow)
    members: tuple[tuple, ...]  # per case: the stamps of its image and its labels

    @cached_property
    def digest(self) -> str:
        """Computed once: every case's status and record asks for it."""
        return json_digest([self.kind, [list(m) for m in self.members]], 20)

    @cached_property
    def _keys(self) -> frozenset[str]:
        return frozenset(_key(m) for m in self.members)

    def grew_from(self, earlier: list) -> bool:
        """True when this set holds every case of ``earlier`` unchanged, and more."""
        return {_key(m) for m in earlier} < self._keys


def conditioning_of(template: Request) -> Conditioning:
    """The cases a run is conditioned on as they are now (name, size and time of each file)."""
    if template.library:
        from ..library.cases import open_library

        cases = open_library(Path(template.library)).cases
        return Conditioning("library", tuple(_member(file_stamp(c.image), file_stamp(c.labels)) for c in cases))
    if template.supports:
        pairs = template.supports
        return Conditioning("support set", tuple(_member(file_stamp(i), file_stamp(lab)) for i, lab in pairs))
    return Conditioning("", ())


def _member(image: list, labels: list) -> tuple:
    return (tuple(image), tuple(labels))


def _key(member) -> str:
    return json_digest(member, 20)


def file_stamp(path) -> list:
    """[name, size, mtime] of a file, or of every file in a folder (a DICOM series)."""
    path = Path(path)
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [str(path), sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0)]
    except OSError:
        return [str(path), None, None]
