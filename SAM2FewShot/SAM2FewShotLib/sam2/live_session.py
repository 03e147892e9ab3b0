"""A live session: one volume kept open for clicks while its slices are encoded in the background.

A click (points and/or a box on one slice, for one object) should cost what SAM2's prompt encoder and
mask decoder cost, but it needs the slice's image-encoder features, by far the expensive part. So the
session encodes slices on a thread of its own, one encoder group (one frame on a CPU) at a time, from
the slice in view outward, into the VolumeSession's FeatureCache: its memory window and scratch
offload, as propagation uses them, so propagation later encodes no slice twice.

Torch must not run two calls on one model at once, so every model call holds the model lock. The
encoder looks for a waiting click between frames and gives way to it, then pauses ``pause_s`` (the
user is likely to click again): a click waits at most for the frame in progress. A click on a slice not
yet encoded encodes it first, and background encoding moves its centre to the clicked slice.

Clicks go through sam2's own interactive path (add_new_points_or_box on an inference state of the
volume), each further click on a slice refining that slice's mask. What the user accepted on a slice,
the mask of their last click or a mask they drew there, is that slice's prompt for propagation: a mask
prompt, kept verbatim in the result (sam2/propagation.py). Points would not do: the same points given at
once to a fresh state answer differently from the click-by-click refinement the user saw.

Prompt methods (click, set_mask, clear, prompts) are meant for one thread, the worker's main thread;
only the encoding runs on another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..common.errors import InputError
from .conditioning import Prompt
from .devices import model_autocast
from .session import VolumeSession

log = logging.getLogger(__name__)

PAUSE_AFTER_CLICK_S = 2.0  # background encoding rests this long after a click: the next click comes soon


@dataclass(frozen=True)
class ClickAnswer:
    """A click's mask on its slice, and where the time went."""

    mask: np.ndarray  # (H, W) bool, the slice's pixels
    object_score: float  # SAM2's object-score logit (> 0: the object is there)
    encoded_now: bool  # the slice had to go through the image encoder first
    waited_s: float  # for the model: the background frame in progress
    encode_s: float
    decode_s: float  # prompt encoder + mask decoder (and the mask's resize to the slice)


@dataclass
class SlicePrompt:
    """What the user accepted on one slice for one object: its mask, from clicks or drawn."""

    mask: np.ndarray
    source: str  # "click" or "drawn"
    clicks: int = 0


def outward(centre: int, n: int) -> Iterator[int]:
    """centre, centre + 1, centre - 1, centre + 2, ... over 0..n-1: the slices nearest the view first."""
    if 0 <= centre < n:
        yield centre
    for d in range(1, n):
        for t in (centre + d, centre - d):
            if 0 <= t < n:
                yield t


class LiveSession:
    """A VolumeSession kept for clicks: background encoding, click answers, prompts per slice and object."""

    def __init__(self, session: VolumeSession, view: int | None = None, pause_s: float = PAUSE_AFTER_CLICK_S,
                 background: bool = True):
        self.session = session
        self.predictor = session.predictor
        self.pause_s = max(0.0, float(pause_s))
        self._centre = self.check_slice(session.num_slices // 2 if view is None else view)
        self._model = threading.Lock()  # held by every torch call on the model
        self._cond = threading.Condition()  # guards the scheduling fields below
        self._waiting = 0  # callers waiting for the model: the encoder gives way
        self._pause_until = 0.0
        self._closed = False
        self._done = False  # every slice is encoded (or the cache keeps no more)
        self._encoded: set[int] = set()
        self._prompts: dict[tuple[int, int], SlicePrompt] = {}  # (slice, object) -> accepted mask
        self._hints: dict[tuple[int, int], np.ndarray] = {}  # drawn masks the next click there refines
        self._state: dict | None = None  # sam2's inference state for clicks, made at the first one
        self.encode_log: list[tuple[int, float, str]] = []  # (slice, seconds, "background" | "click")
        self.failure: str | None = None  # why background encoding stopped early, if it did
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._encode_loop, name="sam2fewshot-live-encoder", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------------------- state

    @property
    def num_slices(self) -> int:
        return self.session.num_slices

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.session.frames.height, self.session.frames.width

    @property
    def encoded_frames(self) -> int:
        """Frames that went through the image encoder so far (reuse shows here)."""
        return self.session.cache.encoded_frames

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def encoding(self) -> bool:
        """Whether the background thread is alive (it ends on close)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def finished(self) -> bool:
        """Background encoding has nothing left to do (every slice kept, or the budget spent) or has stopped."""
        return self._done or not self.encoding

    def is_encoded(self, t: int) -> bool:
        return self.session.cache.holds(t)

    def encoded_count(self) -> int:
        return sum(1 for t in range(self.num_slices) if self.session.cache.holds(t))

    def background_ms_per_slice(self) -> float | None:
        """Mean encoder time of the frames encoded in the background (None before the first)."""
        times = [s for _, s, why in self.encode_log if why == "background"]
        return 1000.0 * sum(times) / len(times) if times else None

    def prompted(self) -> dict[int, dict[int, str]]:
        """object -> {slice: "click" | "drawn"}: the slices that are prompts for the next propagation."""
        out: dict[int, dict[int, str]] = {}
        for (t, o), p in sorted(self._prompts.items()):
            out.setdefault(o, {})[t] = p.source
        return out

    def prompts(self) -> list[Prompt]:
        """Every accepted slice as a mask prompt; an empty one says the object is absent there."""
        return [Prompt(frame=t, obj_id=o, mask=p.mask, erased=not p.mask.any())
                for (t, o), p in sorted(self._prompts.items())]

    def wait_encoded(self, timeout: float | None = None) -> bool:
        """Block until background encoding has nothing left to do; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done or self._closed, timeout)

    # ---------------------------------------------------------------------------- prompts

    def click(self, frame: int, obj_id: int, points=None, labels=None, box=None, clear: bool = False) -> ClickAnswer:
        """The object's mask on ``frame`` after this click. Points (x = column, y = row of the slice) add
        to the slice's earlier clicks for the object; a box, ``clear`` or a drawn mask there starts afresh
        (sam2 takes a box only before points; a drawn mask becomes the dense hint the clicks refine)."""
        points, labels, box = self.check_prompt(frame, obj_id, points, labels, box)
        asked = time.perf_counter()
        with self._turn(pause=True):
            waited = time.perf_counter() - asked
            encoded_now, encode_s = self._encode(frame, "click")
            start = time.perf_counter()
            mask, score = self._decode(frame, obj_id, points, labels, box, clear)
            decode_s = time.perf_counter() - start
        self.look_at(frame)  # the user works here: encode around it next
        old = self._prompts.get((frame, obj_id))
        clicks = old.clicks + 1 if old is not None and old.source == "click" and not clear and box is None else 1
        self._prompts[(frame, obj_id)] = SlicePrompt(mask, "click", clicks)
        return ClickAnswer(mask, score, encoded_now, waited, encode_s, decode_s)

    def set_mask(self, frame: int, obj_id: int, mask: np.ndarray) -> None:
        """A mask the user drew (or corrected) on a slice: that slice's prompt for the object from now on,
        and the starting point of the next click there. An empty mask says the object is absent there."""
        self.check_slice(frame)
        self._check_object(obj_id)
        mask = np.asarray(mask)
        if mask.shape != self.slice_shape:
            raise InputError(f"the mask for slice {frame} has shape {list(mask.shape)}, the slices are "
                             f"{list(self.slice_shape)}")
        mask = mask.astype(bool, copy=True)
        self._prompts[(frame, obj_id)] = SlicePrompt(mask, "drawn")
        self._hints[(frame, obj_id)] = mask

    def clear(self, obj_id: int | None = None, frame: int | None = None) -> int:
        """Forget the prompts of one object and/or one slice (all by default); how many were forgotten."""
        keys = [k for k in self._prompts if (frame is None or k[0] == frame) and (obj_id is None or k[1] == obj_id)]
        state = self._state
        for t, o in keys:
            del self._prompts[(t, o)]
            self._hints.pop((t, o), None)
            if state is not None and o in state["obj_id_to_idx"]:  # only dictionaries change: no model call
                self.predictor.clear_all_prompts_in_frame(state, t, o, need_output=False)
        return len(keys)

    def look_at(self, frame: int) -> None:
        """Background encoding goes on outward from ``frame`` (the slice now in view)."""
        frame = self.check_slice(frame)
        with self._cond:
            self._centre = frame
            self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[VolumeSession]:
        """The model and the session to the caller alone (a propagation, a job of the same worker):
        background encoding waits until the block ends."""
        with self._turn(pause=False):
            yield self.session

    def close(self) -> None:
        """Stop encoding (after the frame in progress), free the features and the scratch file."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        with self._model:
            self._state = None
            self._prompts.clear()
            self._hints.clear()
            self.session.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)

    # ---------------------------------------------------------------------------- checks

    def check_slice(self, t) -> int:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.num_slices:
            raise InputError(f"slice {t} is outside the volume's {self.num_slices} slices (0..{self.num_slices - 1})")
        return int(t)

    def check_prompt(self, frame: int, obj_id: int, points, labels, box):
        """Points (P, 2) float32, labels (P,) int32 and box (4,) float32 (or None), inside the slice."""
        self.check_slice(frame)
        self._check_object(obj_id)
        if points is None and box is None:
            raise InputError("a click needs points or a box")
        h, w = self.slice_shape
        if points is not None:
            points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
            labels = np.asarray(labels if labels is not None else [1] * len(points), dtype=np.int32).reshape(-1)
            if len(labels) != len(points) or not np.isin(labels, (0, 1)).all():
                raise InputError("each point needs a label: 1 (include) or 0 (exclude)")
            if not _inside(points, w, h):
                raise InputError(f"a point lies outside slice {frame} ({w} x {h} pixels)")
        if box is not None:
            box = np.asarray(box, dtype=np.float32).reshape(-1)
            if len(box) != 4 or not _inside(box.reshape(2, 2), w, h) or box[0] > box[2] or box[1] > box[3]:
                raise InputError(f"the box must be [x0, y0, x1, y1] with x0 <= x1, y0 <= y1 inside slice {frame} "
                                 f"({w} x {h} pixels)")
        return points, labels, box

    @staticmethod
    def _check_object(obj_id) -> None:
        if isinstance(obj_id, bool) or not isinstance(obj_id, (int, np.integer)) or not 0 < obj_id <= 65535:
            raise InputError(f"the object id must be a whole number from 1 to 65535, got {obj_id!r}")

    # ---------------------------------------------------------------------------- model work

    @contextmanager
    def _turn(self, pause: bool) -> Iterator[None]:
        """The model lock for a caller the encoder gives way to; with ``pause`` the encoder rests after."""
        with self._cond:
            if self._closed:
                raise InputError("the live session is closed")
            self._waiting += 1
        try:
            with self._model:
                if self._closed:
                    raise InputError("the live session is closed")
                yield
        finally:
            with self._cond:
                self._waiting -= 1
                if pause:
                    self._pause_until = time.monotonic() + self.pause_s
                self._cond.notify_all()

    def _encode(self, t: int, why: str) -> tuple[bool, float]:
        """Frame t through the encoder unless the cache keeps it (model lock held); (encoded, seconds)."""
        start = time.perf_counter()
        if not self.session.cache.encode(t):
            return False, 0.0
        seconds = time.perf_counter() - start
        self.encode_log.append((t, seconds, why))
        self._encoded.update(self.session.cache.group(t))
        return True, seconds

    def _decode(self, frame: int, obj_id: int, points, labels, box, clear: bool) -> tuple[np.ndarray, float]:
        """sam2's interactive path on the click state: prompt encoder + mask decoder on cached features."""
        p = self.predictor
        if self._state is None:
            self._state = p.init_volume_state(self.session.frames, cache=self.session.cache)
        state = self._state
        hint = self._hints.pop((frame, obj_id), None)
        fresh = clear or box is not None or hint is not None or (frame, obj_id) not in self._prompts
        with torch.inference_mode(), model_autocast(p):
            if fresh:
                p.clear_all_prompts_in_frame(state, frame, obj_id, need_output=False)
            if hint is not None:
                _, ids, masks = p.add_box_with_mask_hint(state, frame, obj_id, box=box, points=points, labels=labels,
                                                         mask_hint=hint)
            else:
                _, ids, masks = p.add_new_points_or_box(state, frame, obj_id, points=points, labels=labels,
                                                        clear_old_points=fresh, box=box)
        out = state["temp_output_dict_per_obj"][state["obj_id_to_idx"][obj_id]]["cond_frame_outputs"][frame]
        mask = (masks[list(ids).index(obj_id), 0] > 0).cpu().numpy()
        return mask, float(out["object_score_logits"].float().reshape(-1)[0])

    def _encode_loop(self) -> None:
        """The background thread: the next slice outward from the centre, one frame per model turn."""
        try:
            while self._wait_for_turn():
                with self._model:
                    if self._closed or self._waiting or time.monotonic() < self._pause_until:
                        continue  # a caller came first: look again once it is done
                    t = self._next_frame()
                    if t is not None:
                        self._encode(t, "background")
                with self._cond:
                    self._done = self._done or t is None
                    self._cond.notify_all()
        except Exception as exc:  # noqa: BLE001 - out of memory, say: clicks still encode their own slice
            self.failure = f"{type(exc).__name__}: {exc}"
            log.warning("background encoding of the live session stopped (%s); slices are encoded when clicked",
                        exc)
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _wait_for_turn(self) -> bool:
        """Sleep while callers wait, during the pause after a click, and once all is done; False on close."""
        with self._cond:
            while not self._closed:
                pause = self._pause_until - time.monotonic()
                if self._waiting or self._done:
                    self._cond.wait()
                elif pause > 0:
                    self._cond.wait(pause)
                else:
                    return True
            return False

    def _next_frame(self) -> int | None:
        """The nearest slice to the centre that the cache does not keep; None when none is left, or when
        the cache has started to drop frames (its budget is spent: encoding ahead would be thrown away)."""
        cache = self.session.cache
        if any(not cache.holds(t) for t in self._encoded):
            if self.failure is None:
                self.failure = "the feature budget is spent"
                log.warning("the live session's features fill their memory and disk budget: further slices "
                            "are encoded when clicked or propagated")
            return None
        return next((t for t in outward(self._centre, self.num_slices) if not cache.holds(t)), None)


def _inside(xy: np.ndarray, width: int, height: int) -> bool:
    """Finite (x, y) pairs within the slice's pixel extent."""
    return bool(np.isfinite(xy).all() and (xy[:, 0] >= 0).all() and (xy[:, 0] <= width - 1).all()
                and (xy[:, 1] >= 0).all() and (xy[:, 1] <= height - 1).all())
