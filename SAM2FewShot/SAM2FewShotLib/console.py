"""Console progress bars for the CLI: one tqdm bar per stage, on stderr."""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm


class ConsoleProgress:
    """A ``progress(stage, done, total)`` callback that draws a bar per stage."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr is not None
        self._bar: Optional[tqdm] = None
        self._stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self._stage or self._bar is None or self._bar.total != total:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total, desc=stage, unit="slice", file=sys.stderr, leave=True)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
