"""Console progress for the CLI: one tqdm bar per stage on stderr, in the stage's own unit, with an ETA."""

from __future__ import annotations

import sys

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
        self._bar: tqdm | None = None
        self._stage = ""
        self._line_open = False  # a bar may be on the terminal's last line, not ended by a newline

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled or stage in QUIET_STAGES or total <= 0:
            return
        if stage != self._stage or self._bar is None or self._bar.total != total:
            self.close()
            self._stage = stage
            unit = stage_unit(stage)
            self._line_open = True  # tqdm draws in its constructor: a Ctrl-C there leaves a bar we never got
            self._bar = tqdm(total=total, initial=done, desc=stage, unit=unit, unit_scale=unit == "B",
                             file=sys.stderr, leave=True, dynamic_ncols=True, mininterval=self.min_interval,
                             bar_format=None if unit == "B" else BAR)
        elif done < total:
            self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.n = done  # close() draws the final line, once
            self.close()

    def close(self) -> None:
        """End the bar's line, so that what is printed next (an error, 'interrupted') has a line of its own."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()  # leave=True: it draws its last state and a newline
            self._line_open = False
        if self._line_open and self.enabled:  # a Ctrl-C in tqdm's constructor or close() left the line open
            sys.stderr.write("\n")
            self._line_open = False
