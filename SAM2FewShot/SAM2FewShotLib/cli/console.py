"""Console progress bars for the CLI: one tqdm bar per stage, on stderr."""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm

QUIET_STAGES = ("model",)  # a one-step bar says nothing on a console (the Slicer panel shows it)


class ConsoleProgress:
    """A ``progress(stage, done, total)`` callback that draws a bar per stage."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr is not None
        self._bar: Optional[tqdm] = None
        self._stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled or stage in QUIET_STAGES:
            return
        if stage != self._stage or self._bar is None or self._bar.total != total:
            self.close()
            self._stage = stage
            bytes_ = stage == "download"
            self._bar = tqdm(total=total, desc=stage, unit="B" if bytes_ else "slice", unit_scale=bytes_,
                             file=sys.stderr, leave=True)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
