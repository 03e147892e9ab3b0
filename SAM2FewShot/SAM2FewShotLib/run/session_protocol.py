"""The live-session requests of the worker protocol, their events, and masks packed for the wire.

protocol.py describes the messages (its module docstring is the reference); this module reads and
checks them and builds their events. The worker reads every request line with ``parse_request`` here,
which hands the job-like requests to protocol.parse_request. Imports nothing heavy: numpy only inside
the mask helpers, so a client builds requests before torch is installed.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..sam2.build import ModelOptions
from . import protocol
from .protocol import _NONE, _PATH, ProtocolError, _get, _is_int, _options, _reject_unknown
from .request import FrameOptions

MAX_OBJECT = 65535  # label maps are written as uint8 or uint16 (io/volume.MAX_LABEL)
MAX_PAUSE_S = 60.0


@dataclass(frozen=True, kw_only=True)
class SessionOpen:
    """A volume handed over once for clicks; ``slice`` is the one in view (background encoding starts there)."""

    id: str
    query: str
    model: ModelOptions = field(default_factory=ModelOptions)
    frames: FrameOptions = field(default_factory=FrameOptions)
    slice: int | None = None
    pause_s: float | None = None  # how long background encoding rests after a click (default 2 s)

    def to_message(self) -> dict:
        return {"type": "session_open", **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class SessionClick:
    """Points [x, y, 1 include | 0 exclude] and/or a box [x0, y0, x1, y1] on one slice, for one object."""

    id: str
    session: str
    slice: int
    object: int
    points: tuple[tuple[float, float, int], ...] = ()
    box: tuple[float, float, float, float] | None = None
    clear: bool = False  # start the slice's prompt for the object afresh

    def to_message(self) -> dict:
        return {"type": "session_click", **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class SessionMask:
    """A mask the user drew on a slice for an object, packed (pack_mask): a prompt for the next propagation."""

    id: str
    session: str
    slice: int
    object: int
    shape: tuple[int, int]
    bits: str

    def to_message(self) -> dict:
        return {"type": "session_mask", **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class SessionClear:
    """Forget the prompts of one object and/or one slice (all when both are null)."""

    id: str
    session: str
    object: int | None = None
    slice: int | None = None

    def to_message(self) -> dict:
        return {"type": "session_clear", **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class SessionPropagate:
    """Fill the volume both ways from every prompted slice; the label file and report go where a job's go."""

    id: str
    session: str
    out: str
    report: str
    slice_range: tuple[int, int] | None = None

    def to_message(self) -> dict:
        return {"type": "session_propagate", **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class SessionStatus:
    id: str
    session: str

    def to_message(self) -> dict:
        return {"type": "session_status", **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class SessionClose:
    id: str
    session: str

    def to_message(self) -> dict:
        return {"type": "session_close", **asdict(self)}


SESSION_REQUESTS = (SessionOpen, SessionClick, SessionMask, SessionClear, SessionPropagate, SessionStatus,
                    SessionClose)
# The events that end a session request (with ``error``, and ``result`` for a session_propagate).
SESSION_END_EVENTS = ("session", "mask", "noted", "cleared", "closed")


def parse_request(line: bytes | str):
    """A session request, or whatever protocol.parse_request makes of any other line."""
    data = protocol.decode_line(line)
    kind = data.get("type")
    if kind not in READERS:
        return protocol.parse_request(line)
    request_id = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        protocol._require_valid_text(data, kind)
        request = READERS[kind](data, kind)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), request_id) from None
    if not request.id:
        raise ProtocolError(f"{kind} needs an id", None)
    return request


def _open(data: dict, kind: str) -> SessionOpen:
    _reject_unknown(data, {"type", "id", "query", "model", "frames", "slice", "pause_s"}, kind)
    frames = protocol._frame_options(_get(data, "frames", (dict,), kind, {}))
    if frames.slice_range is not None:
        raise ProtocolError(f"{kind}.frames takes no slice_range: a session covers the volume (a "
                            "session_propagate takes one)")
    pause = _get(data, "pause_s", (int, float, _NONE), kind, None)
    if pause is not None and not (math.isfinite(pause) and 0 <= pause <= MAX_PAUSE_S):
        raise ProtocolError(f"{kind}.pause_s must be from 0 to {MAX_PAUSE_S:g} seconds")
    return SessionOpen(id=_get(data, "id", _PATH, kind), query=_get(data, "query", _PATH, kind),
                       model=_options(ModelOptions, _get(data, "model", (dict,), kind, {}), "model"),
                       frames=frames, slice=_slice(data, kind, None), pause_s=pause)


def _click(data: dict, kind: str) -> SessionClick:
    _reject_unknown(data, {"type", "id", "session", "slice", "object", "points", "box", "clear"}, kind)
    points = _get(data, "points", (list,), kind, [])
    if not all(isinstance(p, list) and len(p) == 3 and all(_number(v) for v in p[:2]) and p[2] in (0, 1)
               and _is_int(p[2]) for p in points):
        raise ProtocolError(f"{kind}.points must be a list of [x, y, 1 (include) or 0 (exclude)]")
    box = _get(data, "box", (list, _NONE), kind, None)
    if box is not None and not (len(box) == 4 and all(_number(v) for v in box)):
        raise ProtocolError(f"{kind}.box must be [x0, y0, x1, y1]")
    if not points and box is None:
        raise ProtocolError(f"{kind} needs points or a box")
    return SessionClick(**_target(data, kind), points=tuple(tuple(p) for p in points),
                        box=None if box is None else tuple(box), clear=_get(data, "clear", (bool,), kind, False))


def _mask(data: dict, kind: str) -> SessionMask:
    _reject_unknown(data, {"type", "id", "session", "slice", "object", "shape", "bits"}, kind)
    shape = _get(data, "shape", (list,), kind)
    if not (len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
        raise ProtocolError(f"{kind}.shape must be [rows, columns]")
    return SessionMask(**_target(data, kind), shape=(shape[0], shape[1]), bits=_get(data, "bits", _PATH, kind))


def _clear(data: dict, kind: str) -> SessionClear:
    _reject_unknown(data, {"type", "id", "session", "slice", "object"}, kind)
    obj = _get(data, "object", (int, _NONE), kind, None)
    if obj is not None and not 0 < obj <= MAX_OBJECT:
        raise ProtocolError(f"{kind}.object must be from 1 to {MAX_OBJECT}")
    return SessionClear(id=_get(data, "id", _PATH, kind), session=_get(data, "session", _PATH, kind), object=obj,
                        slice=_slice(data, kind, None))


def _propagate(data: dict, kind: str) -> SessionPropagate:
    _reject_unknown(data, {"type", "id", "session", "out", "report", "slice_range"}, kind)
    rng = _get(data, "slice_range", (list, _NONE), kind, None)
    if rng is not None and not (len(rng) == 2 and all(_is_int(v) for v in rng) and 0 <= rng[0] <= rng[1]):
        raise ProtocolError(f"{kind}.slice_range must be [first, last] with 0 <= first <= last")
    return SessionPropagate(id=_get(data, "id", _PATH, kind), session=_get(data, "session", _PATH, kind),
                            out=_get(data, "out", _PATH, kind), report=_get(data, "report", _PATH, kind),
                            slice_range=None if rng is None else (rng[0], rng[1]))


def _plain(cls):
    def read(data: dict, kind: str):
        _reject_unknown(data, {f.name for f in fields(cls)} | {"type"}, kind)
        return cls(id=_get(data, "id", _PATH, kind), session=_get(data, "session", _PATH, kind))
    return read


READERS = {"session_open": _open, "session_click": _click, "session_mask": _mask, "session_clear": _clear,
           "session_propagate": _propagate, "session_status": _plain(SessionStatus),
           "session_close": _plain(SessionClose)}


def _target(data: dict, kind: str) -> dict:
    """id, session, slice and object: where a click or a mask goes."""
    obj = _get(data, "object", (int,), kind)
    if not 0 < obj <= MAX_OBJECT:
        raise ProtocolError(f"{kind}.object must be from 1 to {MAX_OBJECT}")
    return {"id": _get(data, "id", _PATH, kind), "session": _get(data, "session", _PATH, kind),
            "slice": _slice(data, kind), "object": obj}


def _slice(data: dict, kind: str, *default) -> int | None:
    value = _get(data, "slice", (int, _NONE) if default else (int,), kind, *default)
    if value is not None and value < 0:
        raise ProtocolError(f"{kind}.slice must be a whole number from 0")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------ masks


def pack_mask(mask) -> str:
    """A (rows, columns) mask as base64 of np.packbits over its row-major pixels (first pixel in the high bit)."""
    import numpy as np

    return base64.b64encode(np.packbits(np.asarray(mask, dtype=bool), axis=None).tobytes()).decode("ascii")


def unpack_mask(bits: str, shape) -> Any:
    """The bool array pack_mask packed; ProtocolError when the bits do not fill ``shape``."""
    import numpy as np

    rows, cols = (int(v) for v in shape)
    try:
        raw = base64.b64decode(bits.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProtocolError("the mask bits are not base64") from None
    if len(raw) != (rows * cols + 7) // 8:
        raise ProtocolError(f"the mask bits hold {len(raw)} bytes, a {rows} x {cols} mask packs into "
                            f"{(rows * cols + 7) // 8}")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=rows * cols).reshape(rows, cols).astype(bool)


# ------------------------------------------------------------------------------------ events


def session(request_id: str, session_id: str, info: dict) -> dict:
    """A session opened (or found open on the same volume: ``reused``), or its status."""
    return {"event": "session", "id": request_id, "session": session_id, **info}


def mask(request: SessionClick, answer) -> dict:
    """A click's answer: the object's mask on the slice, packed, and where the time went."""
    m = answer.mask
    return {"event": "mask", "id": request.id, "session": request.session, "slice": request.slice,
            "object": request.object, "shape": [int(m.shape[0]), int(m.shape[1])], "bits": pack_mask(m),
            "voxels": int(m.sum()), "object_score": round(float(answer.object_score), 4),
            "encoded_now": bool(answer.encoded_now), "waited_ms": _ms(answer.waited_s),
            "encode_ms": _ms(answer.encode_s), "decoder_ms": _ms(answer.decode_s)}


def noted(request: SessionMask, voxels: int) -> dict:
    return {"event": "noted", "id": request.id, "session": request.session, "slice": request.slice,
            "object": request.object, "voxels": int(voxels)}


def cleared(request: SessionClear, removed: int) -> dict:
    return {"event": "cleared", "id": request.id, "session": request.session, "removed": int(removed)}


def closed(request_id: str, session_id: str, frames_encoded: int) -> dict:
    return {"event": "closed", "id": request_id, "session": session_id, "frames_encoded": int(frames_encoded)}


def _ms(seconds: float) -> float:
    return round(1000.0 * float(seconds), 2)
