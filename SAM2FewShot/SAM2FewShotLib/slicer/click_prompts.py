"""The click session's record of which slices of each segment are the user's: the prompts of the next
Propagate. No Qt, no worker: plain bookkeeping on slice digests (panel.slice_digests).

A segment's user slices are the slices clicked or boxed with the SAM2 effect, and the slices the user
drew or corrected with other effects since the last propagation. Slices that a propagation filled are
not. The record keeps, per segment:

- ``prompts``: slice -> what the worker holds as its prompt there (a click's mask or a drawn mask), with
  the slice's digest when it became a prompt and its digest before (``prior``);
- ``baseline``: each slice's digest as the effect last left it (empty before any propagation, so that
  slices the user had drawn before using the effect count as theirs), and the propagations' history.

Before each Propagate, ``review`` compares the segment as it is now with the record: a prompted slice that
changed is a drawn prompt now (sent as a mask), one back to its ``prior`` was undone (Ctrl+Z; its prompt
is cleared); any other slice that differs from the baseline was drawn by the user. A segment that is
exactly as it was before the last propagation had that propagation undone: the baseline before it applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .panel import slice_digests


@dataclass
class SlicePrompt:
    source: str  # "click" (clicks or a box) or "drawn" (drawn or corrected with another effect)
    digest: bytes  # the slice as it was when it became the prompt
    prior: bytes  # the slice before it became a prompt: back to this, the prompt was undone


@dataclass(frozen=True)
class Mark:
    """A prompt as the effect shows it: a point (include or exclude) or a box, in world coordinates."""

    kind: str  # "include", "exclude" or "box"
    t: int
    ras: tuple[float, float, float]
    ras2: tuple[float, float, float] | None = None  # a box's other corner


@dataclass
class Review:
    """What a segment needs before a propagation: prompts to clear, masks to send, and its state."""

    cleared: list[int]
    drawn: dict[int, np.ndarray]  # slice -> the user's (rows, columns) mask there
    digests: tuple[bytes, ...]  # the segment's slices now


@dataclass
class SegmentRecord:
    node: object  # vtkMRMLSegmentationNode
    segment_id: str
    obj: int  # the session's object id (label value of its propagation)
    num_slices: int
    empty: bytes  # the digest of an empty slice
    prompts: dict[int, SlicePrompt] = field(default_factory=dict)
    baseline: tuple[bytes, ...] | None = None  # None: every slice empty
    history: list[tuple[tuple[bytes, ...], tuple[bytes, ...] | None]] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)

    def base(self, t: int) -> bytes:
        return self.empty if self.baseline is None else self.baseline[t]

    def user_slices(self) -> dict[int, str]:
        return {t: p.source for t, p in sorted(self.prompts.items())}

    def clicked(self, t: int, prior: bytes, written: bytes) -> None:
        """A click's mask is on slice ``t`` now (``prior``: the slice before, ``written``: as it is now)."""
        old = self.prompts.get(t)
        self.prompts[t] = SlicePrompt("click", written, old.prior if old is not None else prior)

    def since_click(self, t: int, now: bytes) -> str:
        """What became of slice ``t`` since the effect last wrote a click's mask there (``now``: its digest):
        "none" (no click prompt there), "same", "undone" (back to before the clicks: Ctrl+Z) or "drawn"
        (changed with another effect, or partly undone). An undone or drawn slice loses its points and box:
        undone, it is no prompt any more; drawn, the drawing is (the caller sends it)."""
        prompt = self.prompts.get(t)
        if prompt is None or prompt.source != "click":
            return "none"
        if now == prompt.digest:
            return "same"
        self.marks[:] = [m for m in self.marks if m.t != t]
        if now == prompt.prior:
            del self.prompts[t]
            return "undone"
        self.prompts[t] = SlicePrompt("drawn", now, prompt.prior)
        return "drawn"

    def review(self, mask: np.ndarray, axis: int) -> Review:
        """The user's slices found by comparing the segment's (k, j, i) ``mask`` with the record; the record
        takes them as prompts (the caller sends them to the worker)."""
        slices = np.moveaxis(np.asarray(mask, dtype=bool), axis, 0)
        now = slice_digests(mask, axis)
        while self.history and now == self.history[-1][0]:  # the last propagation was undone
            self.baseline = self.history.pop()[1]
        cleared, drawn = [], {}
        for t, digest in enumerate(now):
            prompt = self.prompts.get(t)
            if prompt is not None and digest == prompt.digest:
                continue
            if prompt is not None and digest == prompt.prior:
                cleared.append(t)
                del self.prompts[t]
                continue
            if prompt is None and digest == self.base(t):
                continue
            drawn[t] = slices[t].copy()
            self.prompts[t] = SlicePrompt("drawn", digest, prompt.prior if prompt is not None else self.base(t))
        return Review(cleared, drawn, now)

    def propagated(self, before: tuple[bytes, ...], after: tuple[bytes, ...]) -> None:
        """A propagation wrote the segment: its slices are the baseline now (not the user's); ``before``
        is how the segment was just before, so that an undo is recognised."""
        self.history.append((before, self.baseline))
        self.baseline = after

    def forget_prompts(self, now: tuple[bytes, ...]) -> None:
        """Clear prompts: no slice is the user's any more; the segment as it is now is the baseline."""
        self.prompts.clear()
        self.marks.clear()
        self.history.clear()
        self.baseline = now
