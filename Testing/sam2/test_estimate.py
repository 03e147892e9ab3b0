"""What to expect on a CPU: after a propagation's first slices, one line says how long the rest will take,
with what a smaller image size would take, on the console and beside the panel's progress."""

from __future__ import annotations

import logging

import pytest

from phantoms import phantom
from SAM2FewShotLib.methods.propagate import segment_propagate
from SAM2FewShotLib.sam2 import estimate
from SAM2FewShotLib.sam2.conditioning import Prompt
from SAM2FewShotLib.sam2.estimate import (
    ESTIMATE_PREFIX,
    PassClock,
    describe_seconds,
    estimate_line,
)
from SAM2FewShotLib.sam2.session import VolumeSession
from SAM2FewShotLib.slicer import panel


class Ticks:
    """A clock that advances ``step`` seconds each time it is read."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_the_rest_of_the_run_is_timed_from_its_first_slices_and_said_once():
    said = []
    clock = PassClock(100, 1024, "cpu", said.append, Ticks(2.0))
    for _ in range(100):
        clock.step()
    # the first slice is left out (one-off costs); 4 slices at 2 s; 95 left
    assert said == ["expected time: about 3 min more on this CPU at 1024 px (--image-size 512: about 35 s)"]
    assert clock.announced == said[0]


@pytest.mark.parametrize("steps, device, size", [(12, "cpu", 1024), (100, "cuda", 1024), (100, "cpu", 256)])
def test_short_runs_and_gpus_get_no_announcement(steps, device, size):
    said = []
    clock = PassClock(steps, size, device, said.append, Ticks(0.2 if size == 256 else 2.0))
    for _ in range(steps):
        clock.step()
    assert said == []  # under 20 s left, or a GPU


def test_times_read_as_a_person_would_say_them():
    assert [describe_seconds(s) for s in (3, 42, 95, 3000, 4800, 7200)] == \
        ["about 5 s", "about 40 s", "about 2 min", "about 50 min", "about 1 h 20 min", "about 2 h"]
    assert estimate_line(600, 768, "cpu") == "expected time: about 10 min more on this CPU at 768 px"
    assert estimate_line(600, 512, "mps").endswith("on this Mac's GPU at 512 px (--image-size 256: about 5 min)")


def test_a_real_propagation_says_its_expected_time(small_predictor, monkeypatch, caplog):
    monkeypatch.setattr(estimate, "MIN_SECONDS", 0.0)  # this small run is far shorter than any announced one
    image, labels = phantom((12, 40, 48))
    prompts = [Prompt(frame=6, obj_id=v, mask=labels.volume.array[6] == v) for v in (1, 2)]
    with caplog.at_level(logging.WARNING):
        segment_propagate(VolumeSession(small_predictor, image, axis=0), prompts, labels.segments)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(ESTIMATE_PREFIX)]
    assert len(lines) == 1 and " more on this CPU at 128 px" in lines[0]


def test_the_panel_shows_the_expected_time_beside_the_progress():
    line = panel.panel_message(estimate_line(600, 1024, "cpu"))
    assert line == "Expected time: about 10 min more on this CPU at 1024 px."  # no image size control there
    assert panel.progress_text("propagate forward", 12, 80, line) == \
        f"Propagating forward: slice 12 of 80. {line}"
    assert panel.progress_text("propagate forward", 12, 80) == "Propagating forward: slice 12 of 80"
