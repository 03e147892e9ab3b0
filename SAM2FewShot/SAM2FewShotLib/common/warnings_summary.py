"""Repeated warnings as one line: a count and the first few examples.

A library of 300 segments can raise the same warning for most of them (a label named differently in
two cases, a name used twice); a page of near-identical lines hides the one that matters. Code that
may warn many times of one kind collects the occurrences here and logs one line per kind when done.
A kind that occurred once is logged with its full message, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

SHOWN = 3  # examples named in a summary line


@dataclass
class _Kind:
    summary: str
    examples: list[str] = field(default_factory=list)
    first_message: str = ""


class RepeatedWarnings:
    """Collects warnings by kind; ``flush()`` (or leaving the ``with`` block) logs one line per kind."""

    def __init__(self, logger: logging.Logger, shown: int = SHOWN):
        self.logger = logger
        self.shown = shown
        self._kinds: dict[str, _Kind] = {}

    def add(self, summary: str, example: str, message: str) -> None:
        """One occurrence. ``summary`` names the kind (the line's start when it repeats, e.g. "library:
        label values named differently in two cases; the first name is used"), ``example`` this
        occurrence briefly ("label 3: 'liver' and 'Liver'"), ``message`` the full line when it is the only one."""
        kind = self._kinds.setdefault(summary, _Kind(summary, first_message=message))
        kind.examples.append(example)

    def flush(self) -> None:
        """Log what was collected, one line per kind, and start again."""
        for kind in self._kinds.values():
            self.logger.warning("%s", summary_line(kind.summary, kind.examples, kind.first_message, self.shown))
        self._kinds.clear()

    def __enter__(self) -> RepeatedWarnings:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


def summary_line(summary: str, examples: list[str], single: str, shown: int = SHOWN) -> str:
    """``single`` for one occurrence; else "<summary> (N times): a, b, c and N-3 more"."""
    if len(examples) == 1:
        return single
    more = f" and {len(examples) - shown} more" if len(examples) > shown else ""
    return f"{summary} ({len(examples)} times): {', '.join(examples[:shown])}{more}"
