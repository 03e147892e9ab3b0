"""What a run carries from the Runner down to the SAM2 core besides its inputs: where its progress goes,
whether the user cancelled, and which slices it covers. One object, in the spirit of nnU-Net's predictor
holding its settings, instead of three parameters threaded through every function. The device and the
precision travel with the model itself (the predictor knows both). Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import Cancelled
from .progress import ProgressFn


@dataclass(frozen=True)
class RunContext:
    progress: ProgressFn | None = None  # progress(stage, done, total)
    should_cancel: Callable[[], bool] | None = None  # True once the user cancelled
    frame_range: tuple[int, int] | None = None  # first, last slice (inclusive) along the slicing axis

    def report(self, stage: str, done: int, total: int) -> None:
        """Progress of a stage, when someone listens."""
        if self.progress is not None:
            self.progress(stage, done, total)

    def check_cancelled(self) -> None:
        """Raise Cancelled once the user cancelled: called between units of work."""
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("cancelled by the user")

    def cancellable_progress(self) -> ProgressFn:
        """A progress callback that stops the work (Cancelled) once the user cancelled: for stages that
        only report progress (embedding a library, fitting LoRA) and have no loop of ours to check in."""
        def report(stage: str, done: int, total: int) -> None:
            self.check_cancelled()
            self.report(stage, done, total)

        return report
