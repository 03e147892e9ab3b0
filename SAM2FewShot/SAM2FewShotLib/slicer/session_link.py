"""The click session's line to the worker: its live session opened, requests sent in order, answers polled.

Runs on the panel's own worker client (the RunController's, shared through shared_client.py: one worker
and one model serve the panel and the effect). The volume goes to the worker once, as a file written on a
thread into the panel's VolumeStore (the RunController's ``volumes``: a volume the panel ran on is not
written again, nor this one by the panel's next Apply), kept under the session's own name until it ends.
Requests made before the session is open wait for it. A worker that lost the session (a panel job on
another model ended it, a cancelled run or a new cache folder stopped the worker) gets it back: the
session is opened again, the subclass's ``restore_masks`` (the user's slices) are sent, then the
requests that were lost, once. No Qt: click_session.ClickSession builds on it, the effect's timer calls
``poll()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..io.volume import Volume
from ..run import session_protocol as sp
from ..run.request import FrameOptions
from .click_geometry import plane_for_axis
from .mrml_volume import volume_from_node
from .shared_client import shared
from .volume_store import Preparation, VolumeStore

log = logging.getLogger(__name__)

RESENDABLE = ("click", "mask", "clear", "propagate")  # what a lost session's reopening sends again


@dataclass
class SessionVolume:
    """The volume a session is on: its node, what makes it the same, its grid, model, frames and axis."""

    node: object
    key: tuple
    grid: Volume  # geometry only (volume_store.grid_of)
    model: object  # ModelOptions
    normalization: str
    axis: int | None = None
    voxels: Volume | None = None  # read for the first click, handed to the file writer when it opens


@dataclass
class Request:
    kind: str  # open, click, mask, clear, propagate, status, close
    make: Callable[[str, str | None], object]  # (request id, session id) -> the request
    record: object = None  # click_prompts.SegmentRecord
    data: dict = field(default_factory=dict)
    retried: bool = False


class SessionLink:
    """One live session on the RunController's worker; subclasses answer masks and results."""

    def __init__(self, runs, on_message: Callable[[str], None] = log.info, pause_s: float | None = None):
        self.runs, self.on_message, self.pause_s = runs, on_message, pause_s
        self.store: VolumeStore = runs.volumes
        self._store_user = ""  # the name the session's volume file is kept under, new for each opening
        self.info: dict = {}  # the last session event (session_open or session_status)
        self.message = ""
        self.session_id: str | None = None
        self.volume: SessionVolume | None = None
        self._preparing: Preparation | None = None
        self._view: int | None = None
        self._open_id: str | None = None
        self._outstanding: dict[str, Request] = {}
        self._waiting: list[Request] = []  # sent once the session is open
        self._restore = False  # the worker lost the session: send the user's slices again on opening

    @property
    def busy(self) -> bool:
        """Something is on its way (a status or a close is not waited for)."""
        return bool(self._preparing or self._waiting or any(r.kind not in ("status", "close")
                                                            for r in self._outstanding.values()))

    @property
    def volume_files(self) -> list:
        """The volume file this session keeps in the store (none before it opens or after it ends)."""
        return self.store.kept(self._store_user) if self._store_user else []

    @property
    def is_open(self) -> bool:
        return self.session_id is not None

    @property
    def opening(self) -> bool:
        return bool(self.session_id or self._open_id or self._preparing)

    def pending(self, kinds=RESENDABLE) -> bool:
        return any(r.kind in kinds for r in (*self._outstanding.values(), *self._waiting))

    def request_status(self) -> None:
        """Ask the worker for the session's status (``info`` is updated by ``poll``)."""
        if self.session_id:
            self.send("status", lambda i, s: sp.SessionStatus(id=i, session=s))

    def poll(self) -> bool:
        """Pass the worker's answers on (never blocks); True while something is on its way."""
        if self._preparing is not None and self._preparing.done():
            self._opened_file()
        client = self.runs.client
        if client is None or not hasattr(client, "take_inbox"):
            return self.busy
        client.pump()
        for event in client.take_inbox():
            self._on_event(event)
        lost = [i for i in self._outstanding if i not in client.pending]
        if lost:  # the worker was stopped (a panel run cancelled, the cache folder changed)
            self._session_lost([self._outstanding.pop(i) for i in lost], "the background worker was stopped")
        return self.busy

    def end(self) -> str | None:
        """End the session on the worker and remove its volume file; the session it was (None: none)."""
        client = self.runs.client
        session = self.session_id or self._open_id
        if session and client is not None and getattr(client, "is_alive", False):
            self._submit(Request("close", lambda i, s: sp.SessionClose(id=i, session=s)), session)
        for request in self._outstanding.values():
            _remove_folder(request)
        user = self._store_user
        if self._preparing is not None:  # released once written, never under the writer
            self._preparing.drop(lambda: self.store.release(user))
        else:
            self.store.release(user)
        self._outstanding = {i: r for i, r in self._outstanding.items() if r.kind == "close"}
        self.volume, self._preparing, self._open_id, self.session_id = None, None, None, None
        self._waiting, self._restore, self.info = [], False, {}
        return session

    # ---------------------------------------------------------------------------- sending

    def open(self, view: int) -> None:
        """Write the volume's file (on a thread), then open the session on it, ``view`` the slice in view."""
        state = self.volume
        volume, state.voxels = state.voxels or volume_from_node(state.node), None  # in memory until written
        self._view = view
        before, user = self._store_user, f"session-{time.time_ns()}"
        self._store_user = user
        self._preparing = Preparation(lambda: self._volume_file(volume, user, before))

    def _volume_file(self, volume: Volume, user: str, before: str) -> object:
        """The volume's file kept under ``user``; the one of an earlier opening (a lost session's) let go
        after, so the same volume is not written again."""
        path = self.store.file_for(volume, user)
        if before:
            self.store.release(before)
        return path

    def send(self, kind: str, make, record=None, data=None) -> None:
        """A request for the session: now when it is open, else once it is (opened if need be)."""
        request = Request(kind, make, record, data or {})
        if self.session_id is None:
            self._waiting.append(request)
            if not self.opening and self.volume is not None:
                self.open(self._view or 0)
            return
        self._submit(request, self.session_id)

    def _opened_file(self) -> None:
        path, problem = self._preparing.outcome()
        self._preparing = None
        if problem is not None:
            self.say(f"SAM2 could not start: {problem}")
            self.close()
            return
        state = self.volume
        frames = FrameOptions(axis=plane_for_axis(state.grid, state.axis), normalization=state.normalization)
        request = Request("open", lambda i, s: sp.SessionOpen(id=i, query=str(path), model=state.model, frames=frames,
                                                              slice=self._view, pause_s=self.pause_s))
        self._open_id = self._submit(request, None)

    def _submit(self, request: Request, session: str | None) -> str:
        client = shared(self.runs)
        request_id = f"sam2click-{request.kind}-{time.time_ns()}"
        client.submit(request.make(request_id, session), claim=True)
        self._outstanding[request_id] = request
        return request_id

    # ---------------------------------------------------------------------------- answers

    def _on_event(self, event: dict) -> None:
        kind, request = event["event"], self._outstanding.get(event.get("id"))
        if request is None:
            if kind == "error" and event.get("id") is None and self.is_open:
                self.say(f"SAM2: {event['message']}")
            return
        if kind in ("progress", "log"):
            if kind == "progress" and request.kind in ("open", "propagate"):
                self.message = f"SAM2: {event['stage']} ({event['done']}/{event['total']})"
            return
        del self._outstanding[event["id"]]
        if kind == "error":
            self._on_error(request, event["message"])
        elif request.kind == "open":
            self._on_open(event)
        elif request.kind == "status":
            self.info = event
        else:
            self.answered(request, event)

    def _on_open(self, event: dict) -> None:
        self.session_id, self._open_id, self.info = event["session"], None, event
        if self.volume is not None and event.get("axis") != "kji"[self.volume.axis]:  # never seen: say so, stop
            self.say(f"SAM2 sliced the volume along {event.get('axis')}, not along the view's axis: click again")
            self.close()
            return
        if event.get("prompts"):  # a session the worker kept from before (a reloaded module): start clean
            self._submit(Request("clear", lambda i, s: sp.SessionClear(id=i, session=s)), self.session_id)
        if self._restore:  # the worker lost the session: the user's slices go back as masks
            self._restore = False
            for obj, t, mask in self.restore_masks():
                self._submit(Request("mask", lambda i, s, o=obj, t=t, m=mask: sp.SessionMask(
                    id=i, session=s, slice=t, object=o, shape=m.shape, bits=sp.pack_mask(m))), self.session_id)
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            self._submit(request, self.session_id)

    def _on_error(self, request: Request, message: str) -> None:
        if request.kind in ("close", "status"):  # a session the worker had already ended: nothing to tell
            log.info("SAM2 session %s: %s", request.kind, message)
        elif request.kind == "open":
            self.say(f"SAM2 could not open the volume: {message}")
            self.close()
        elif "live session" in message and request.kind in RESENDABLE:
            self._session_lost([request], message)
        else:
            _remove_folder(request)
            self.say(f"SAM2: {message}")

    def _session_lost(self, requests: list[Request], why: str) -> None:
        """Open the session again, send the user's slices back, then the requests that were lost (once)."""
        again = [r for r in requests if r.kind in RESENDABLE and not r.retried]
        for r in requests:
            if r not in again:
                _remove_folder(r)
        self.session_id, self._open_id, self._restore = None, None, True
        if self.volume is None:
            return
        log.info("the SAM2 session was lost (%s): opening it again", why)
        for r in again:
            r.retried = True
        self._waiting = again + self._waiting
        if again and not self._preparing:
            self.open(self._view or 0)

    # ---------------------------------------------------------------------------- for subclasses

    def answered(self, request: Request, event: dict) -> None:
        """A click's mask, a propagation's result, a noted mask or cleared prompts."""

    def restore_masks(self) -> Iterator[tuple[int, int, object]]:
        """(object, slice, mask) of every user slice, sent to a session opened again."""
        return iter(())

    def close(self, reason: str = "") -> None:
        self.end()

    def say(self, message: str) -> None:
        self.message = message
        self.on_message(message)


def _remove_folder(request: Request) -> None:
    if "folder" in request.data:
        request.data["folder"].remove()
