"""The worker's live session: session requests in, events out (protocol.py describes both).

One session at a time, on the Runner's one model: a session that another volume or another model would
need is closed first, never kept beside a second model. While the worker runs a job or a library_add,
the session's background encoding waits (the model is the job's), or the session closes when the job
loads another model. Every error is an InputError the worker turns into one error event.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..common.cache import require_cache
from ..common.context import RunContext
from ..common.errors import InputError
from ..common.progress import ProgressFn
from ..io.normalization import Normalization
from ..sam2.build import ModelOptions
from . import protocol
from . import session_protocol as sp
from .outputs import check_outputs, write_outputs
from .runner import check_model_options, checked_frame_range, content_digest

log = logging.getLogger(__name__)


class SessionHost:
    """Holds the worker's live session (at most one) and answers its requests."""

    def __init__(self, runner):
        self.runner = runner
        self.live = None  # sam2/live_session.LiveSession
        self.session_id: str | None = None
        self._key: tuple | None = None  # volume content, frames, normalisation, model: what makes it the same
        self._model_key: tuple | None = None
        self._model_info: dict = {}

    def handle(self, request, progress: ProgressFn) -> dict:
        """The one event that ends ``request`` (progress events go out through ``progress``)."""
        if isinstance(request, sp.SessionOpen):
            return self.open(request, progress)
        live = self._session(request.session)
        if isinstance(request, sp.SessionClick):
            points = [p[:2] for p in request.points] or None
            labels = [p[2] for p in request.points] or None
            answer = live.click(request.slice, request.object, points, labels, request.box, request.clear)
            return sp.mask(request, answer)
        if isinstance(request, sp.SessionMask):
            mask = sp.unpack_mask(request.bits, request.shape)
            live.set_mask(request.slice, request.object, mask)
            return sp.noted(request, int(mask.sum()))
        if isinstance(request, sp.SessionClear):
            if request.slice is not None:
                live.check_slice(request.slice)
            return sp.cleared(request, live.clear(request.object, request.slice))
        if isinstance(request, sp.SessionPropagate):
            return self.propagate(request, progress)
        if isinstance(request, sp.SessionStatus):
            return sp.session(request.id, self.session_id, self.describe(reused=True))
        frames = live.encoded_frames
        self.close()
        return sp.closed(request.id, request.session, frames)

    # ---------------------------------------------------------------------------- requests

    def open(self, request: sp.SessionOpen, progress: ProgressFn) -> dict:
        """The session on the request's volume: the open one when it is the same, else a new one."""
        from ..sam2.live_session import PAUSE_AFTER_CLICK_S, LiveSession

        if not os.path.isabs(request.query):
            raise InputError(f"session_open.query must be an absolute path, got '{request.query}': the worker's "
                             "working folder is not the client's")
        check_model_options(request.model)
        frames = request.frames
        normalization = Normalization.parse(frames.normalization, per_slice=frames.per_slice_normalization)
        key = (self._digest(request.query), frames, normalization, request.model.key())
        if self.live is not None and key == self._key:
            if request.slice is not None:
                self.live.look_at(self.live.check_slice(request.slice))
            return sp.session(request.id, self.session_id, self.describe(reused=True))
        self.close()  # another volume (or axis, normalisation, model): one session at a time
        require_cache()  # the scratch file of offloaded features lives there
        _, info = self.runner.model(request.model, progress)
        # the runner's warm session of this volume: a job on it reuses the clicks' features, and the other way
        session = self.runner.hold_session(request.query, frames, request.model, progress)
        try:
            view = None if request.slice is None else _checked_view(request.slice, session.num_slices)
            pause = PAUSE_AFTER_CLICK_S if request.pause_s is None else request.pause_s
            self.live = LiveSession(session, view=view, pause_s=pause)
        except BaseException:
            self.runner.let_go(session)
            raise
        self.session_id, self._key, self._model_key, self._model_info = request.id, key, request.model.key(), info
        return sp.session(request.id, request.id, self.describe(reused=False))

    def propagate(self, request: sp.SessionPropagate, progress: ProgressFn) -> dict:
        """Every prompted slice propagated both ways (methods/propagate.py), written as a job's result."""
        from ..io.volume import default_segments
        from ..methods.propagate import segment_propagate

        live = self._session(request.session)
        for name in ("out", "report"):
            if not os.path.isabs(getattr(request, name)):
                raise InputError(f"session_propagate.{name} must be an absolute path, got '{getattr(request, name)}'")
        frame_range = checked_frame_range(request.slice_range, live.num_slices)
        check_outputs(request.out, request.report)
        prompts = live.prompts()
        if not prompts:
            raise InputError("nothing to propagate yet: click on a slice, or draw a mask on one, first")
        segments = default_segments(sorted({p.obj_id for p in prompts}))
        start = time.perf_counter()
        with live.exclusive() as session:
            labels, report = segment_propagate(session, prompts, segments, RunContext(progress, None, frame_range))
        report["model"] = dict(self._model_info)
        report["live_session"] = {"session": self.session_id, "prompts": _json_prompts(live.prompted()),
                                  "frames_encoded_total": live.encoded_frames}
        write_outputs(labels, report, request.out, request.report)
        encoded = int(report["timing"]["frames_encoded"])
        return protocol.result(request.id, request.out, request.report, time.perf_counter() - start, encoded, True)

    def describe(self, reused: bool) -> dict:
        """The session as its ``session`` event tells it."""
        live = self.live
        info = live.session.describe()
        axis = info["axis"]
        rows, columns = [name for name in "kji" if name != axis]
        ms = live.background_ms_per_slice()
        return {"reused": reused, "slices": live.num_slices, "slice_shape": list(live.slice_shape), "axis": axis,
                "rows": rows, "columns": columns, "plane": _plane(live), "image_size": info["image_size"],
                "precision": self._model_info.get("precision"), "encoded": live.encoded_count(),
                "frames_encoded": live.encoded_frames,
                "encode_ms_per_slice": None if ms is None else round(ms, 2), "encoding": not live.finished,
                "prompts": _json_prompts(live.prompted())}

    # ---------------------------------------------------------------------------- life

    @contextmanager
    def around_job(self, model: ModelOptions | None) -> Iterator[None]:
        """A job's time on the model: background encoding waits; a job on another model ends the session
        first (one model in memory)."""
        if self.live is None:
            yield
            return
        if model is not None and model.key() != self._model_key:
            log.info("the live session closed: a job loads another model")
            self.close()
            yield
            return
        with self.live.exclusive():
            yield

    def close(self) -> None:
        """End the session: encoding stops after the frame in progress, features and scratch are freed."""
        live, self.live = self.live, None
        self.session_id, self._key, self._model_key = None, None, None
        if live is not None:
            live.close()
            self.runner.let_go(live.session)

    def _session(self, session_id: str):
        if self.live is None:
            raise InputError(f"no live session is open (asked for '{session_id}'): send a session_open first")
        if session_id != self.session_id:
            raise InputError(f"the live session '{session_id}' is not open (the open one is '{self.session_id}')")
        return self.live

    def _digest(self, path: str) -> str:
        root = Path(path)
        if not root.exists():
            raise InputError(f"{path} does not exist")
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        return content_digest(root, files)


def _checked_view(t: int, n: int) -> int:
    if not 0 <= t < n:
        raise InputError(f"slice {t} is outside the volume's {n} slices (0..{n - 1})")
    return t


def _plane(live) -> str:
    from ..io.slicing import anatomical_plane

    return anatomical_plane(live.session.volume, live.session.axis)


def _json_prompts(prompted: dict[int, dict[int, str]]) -> dict[str, dict[str, str]]:
    return {str(o): {str(t): source for t, source in slices.items()} for o, slices in prompted.items()}
