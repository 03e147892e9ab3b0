"""What to expect on a CPU: the time a propagation will take, from timing its first slices.

A run at the model's own 1024 px on a laptop CPU can take many minutes with no word; after the first
few slices of the first pass the time per slice is known, and with it the rest of the run. One line
says it (console and panel), with what a smaller --image-size would take on the same machine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

ESTIMATE_PREFIX = "expected time"  # the panel recognises the line by it (slicer/runs.py)
TIMED_STEPS = 4  # slices timed after the first (which pays one-off costs): one encoder batch of 4 among them
# A run expected to be shorter than this (seconds) needs no announcement; the environment can lower it
# (the panel's headless tests make a short run announce itself).
MIN_SECONDS = float(os.environ.get("SAM2FEWSHOT_ANNOUNCE_AFTER_S", "20"))
# Relative cost of one propagated slice by image size: hiera-tiny, fp32, 2 threads, measured with
# `sam2fewshot bench --profile` on this project's 2-core CI machine (0.409, 0.754 and 3.877 s per slice
# at 256, 512 and 1024 px). Other processors differ in speed, much less in these ratios.
SIZE_COST = {256: 0.409, 512: 0.754, 1024: 3.877}


def describe_seconds(seconds: float) -> str:
    """'about 40 s', 'about 3 min', 'about 1 h 20 min'."""
    if seconds < 90:
        return f"about {max(5, round(seconds / 5) * 5):.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60:02d} min" if minutes % 60 else f"about {minutes // 60} h"


def estimate_line(remaining_s: float, image_size: int, device_type: str) -> str:
    """'expected time: about 8 min more on this CPU at 1024 px (--image-size 512: about 1 min)'."""
    where = {"cpu": "this CPU", "mps": "this Mac's GPU", "cuda": "this GPU"}.get(device_type, device_type)
    line = f"{ESTIMATE_PREFIX}: {describe_seconds(remaining_s)} more on {where} at {image_size} px"
    smaller = [s for s in sorted(SIZE_COST) if s < image_size]
    if image_size in SIZE_COST and smaller:
        other = smaller[-1]
        line += f" (--image-size {other}: {describe_seconds(remaining_s * SIZE_COST[other] / SIZE_COST[image_size])})"
    return line


class PassClock:
    """Times the first slices of a propagation and announces, once, how long the rest will take.

    ``steps`` is the number of slices the whole propagation will visit (both passes); only a run on
    a CPU (or MPS) expected to last more than MIN_SECONDS is announced.
    """

    def __init__(self, steps: int, image_size: int, device_type: str,
                 say: Callable[[str], None] = log.warning, clock: Callable[[], float] = time.perf_counter):
        self.steps, self.image_size, self.device_type = int(steps), int(image_size), device_type
        self.say, self.clock = say, clock
        self.done = 0
        self._first: float | None = None  # after the first slice: its one-off costs left out
        self.announced: str | None = None

    def step(self) -> None:
        self.done += 1
        if self.announced is not None or self.device_type == "cuda":
            return
        now = self.clock()
        if self.done == 1:
            self._first = now
        elif self.done == TIMED_STEPS + 1 and self._first is not None:
            per_slice = (now - self._first) / TIMED_STEPS
            remaining = per_slice * (self.steps - self.done)
            if remaining >= MIN_SECONDS:
                self.announced = estimate_line(remaining, self.image_size, self.device_type)
                self.say(self.announced)
