"""Console progress for the CLI: one tqdm bar per stage on stderr, in the stage's own unit, with an ETA."""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm

from ..common.progress import LOAD_MODEL, stage_unit

QUIET_STAGES = (LOAD_MODEL,)  # a one-step bar says nothing on a console (the Slicer panel shows it)
BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}]"


class ConsoleProgress:
    """A ``progress(stage, done, total)`` callback that draws a bar per stage.

    A bar starts at the first count it is given (so its rate is not a count over a microsecond),
    and is closed, once, when its stage completes or another begins.
    """

    def __init__(self, enabled: bool = True, min_interval: float = 0.1):
        self.enabled = enabled and sys.stderr is not None
        self.min_interval = min_interval  # seconds between redraws
        self._bar: Optional[tqdm] = None
        self._stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled or stage in QUIET_STAGES or total <= 0:
            return
        if stage != self._stage or self._bar is None or self._bar.total != total:
            self.close()
            self._stage = stage
            unit = stage_unit(stage)
            self._bar = tqdm(total=total, initial=done, desc=stage, unit=unit, unit_scale=unit == "B",
                             file=sys.stderr, leave=True, dynamic_ncols=True, mininterval=self.min_interval,
                             bar_format=None if unit == "B" else BAR)
        elif done < total:
            self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.n = done  # close() draws the final line, once
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
