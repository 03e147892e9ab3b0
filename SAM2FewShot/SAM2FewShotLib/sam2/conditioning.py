"""What conditions SAM2 on a slice: the user's (or a prior's) prompts, and the memory policy a method
swaps in (its support memories, which prompts attend). Plain data, no torch: the methods declare their
conditioning with these before any model is loaded (sam2/propagation.py runs them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Prompt:
    """A user (or prior) prompt for one object on one slice, in slice pixel coordinates (x = column)."""

    frame: int
    obj_id: int
    mask: np.ndarray | None = None
    box: Sequence[float] | None = None  # x0, y0, x1, y1
    points: np.ndarray | None = None  # (P, 2) x, y
    point_labels: np.ndarray | None = None  # 1 positive, 0 negative
    mask_hint: np.ndarray | None = None  # with box/points (or alone): a dense hint SAM2 refines, never kept
    erased: bool = False  # an empty mask meant as such: the object is absent on this slice

    @property
    def kind(self) -> str:
        if self.mask is not None:
            return "mask"
        parts = [p for p, v in (("box", self.box), ("points", self.points), ("mask-hint", self.mask_hint))
                 if v is not None]
        return "+".join(parts)


class MemoryPolicy:
    """Which memories condition each slice: the prompts, plus the neighbouring predictions.

    Subclasses (matched support, retrieval) swap in other conditioning frames per slice.
    """

    temporal = True  # use the memory of neighbouring slices' predictions
    # Without prompts, how the passes sweep the volume: "both" ways in full, averaged; "forward"
    # only; "middle-out": backward from the middle, then forward from the slice after it, the
    # memory carried over (FATE-SAM's order). Prompts always propagate both ways.
    passes = "both"
    max_cond_frames: int | None = None  # sam2's max_cond_frames_in_attn for the run (None: the model's)
    obj_ids: tuple[int, ...] = ()  # objects conditioned by the policy's own memories, not by prompts

    def prepare(self, predictor, state: dict) -> None:
        """Hook run once the prompts are added, before the passes: add conditioning outputs here."""

    def cond_outputs(self, obj_idx: int, frame: int, reverse: bool, prompts: dict) -> dict:
        return prompts

    def describe(self, obj_idx: int, frame: int) -> dict | None:
        """Per-slice report entries of this policy (what conditioned the slice)."""
        return None

    def video_length(self, obj_idx: int, frame: int) -> int | None:
        """The length of the video this slice is computed in, if not the volume's own stack: sam2
        scales object-pointer distances by it (a pair is a 2-frame video, whatever the volume)."""
        return None
