"""The background worker's protocol: JSON lines on stdin (requests) and stdout (events).

The worker (``python -m SAM2FewShotLib.run.worker``) reads one JSON object per line on stdin and writes
one JSON object per line on stdout. Nothing else ever reaches its stdout: what libraries print
(tqdm, warnings, C-level output) goes to stderr, which the client reads only to explain a crash.
Data travel as files in a folder the client owns; the messages carry their paths.

Requests (stdin)::

    {"type": "job", "id": "j1",
     "method": "propagate" | "matched-support" | "registration" | "guided" | "retrieval",
     "query": "/tmp/x/query.nrrd",
     "prompt_labels": "/tmp/x/prompt.nrrd", "values": [1, 2],        # propagate (values optional)
     "prompts": "/tmp/x/prompts.json",                                 # propagate: boxes and points
     "supports": [["/tmp/x/s0.nrrd", "/tmp/x/s0_labels.nrrd"], ...],  # matched-support, registration, guided
     "library": "/data/labelled_cases",                                # retrieval
     "out": "/tmp/x/result.seg.nrrd", "report": "/tmp/x/report.json",
     "model": {"name": "sam2.1-tiny", "checkpoint": null, "config": null, "image_size": null,
               "device": "auto", "offline": false, "random_weights": false, "seed": 0,
               "threads": null, "precision": null | "fp32" | "bf16" | "auto"},
     "frames": {"axis": "auto", "normalization": "auto", "per_slice_normalization": false,
                "slice_range": [first, last] | null, "frame": N | null, "component": N | null,
                "series": "DICOM series UID" | null},
     "params": {...},                                                 # method parameters
     "input_notes": [{...}]}                                          # optional: appended to the report
    {"type": "library_add", "id": "a1", "library": "/data/library", "image": "/x/case.nrrd",
     "labels": "/x/case.seg.nrrd", "name": "case" | null, "replace": false, "model": {...}}
    {"type": "example_data", "id": "e1"}
    {"type": "shutdown"}

A ``library_add`` (library/add.add_case) adds one labelled case to a library and syncs the indexes it
already has, with the features the worker loads for them (SAM2's: the ``model`` given, kept warm).
An ``example_data`` fetches the demo's public pair into the worker's cache (io/example_data.py: downloaded
once, MD5-checked, unpacked), in the worker so that Slicer's process never blocks on the download.

``model``, ``frames`` and ``params`` and every key inside them are optional (defaults above);
``params`` holds the fields of the method's ``Params`` (methods/<method>.py), nested groups as
objects (guided: ``{"prior": "sam2", "fewshot": {"top_k": 2}, "lora": {"steps": 50}}``). A job is a
Request (run/request.py) with an id: the worker hands it to the Runner as it is. ``input_notes`` says
what the client did to an input before writing its file (the panel: a DICOM volume read hardened
through its acquisition transform, slicer/mrml_volume.py); the report's input_notes begin with them.

Events (stdout)::

    {"event": "ready", "pid": 123, "version": "0.1.0",
     "devices": {"cuda": [{"name": "NVIDIA H200", "free_gib": 139.2, "total_gib": 139.8}], "mps": false}}
    {"event": "progress", "id": "j1", "stage": "encode query" | "propagate forward" | ..., "done": 3, "total": 8}
    {"event": "log", "level": "info" | "warning" | "error", "message": "..."}
    {"event": "result", "id": "j1", "labels": path, "report": path, "seconds": 2.1,
     "frames_encoded": 0, "session_reused": true}
    {"event": "added", "id": "a1", "case": "case", "library": path, "message": "one line"}
    {"event": "example", "id": "e1", "query": path, "support": path, "support_labels": path,
     "query_case": "hippocampus_015", "support_case": "hippocampus_184", "names": {"1": "anterior hippocampus"}}
    {"event": "error", "id": "j1" | null, "message": "one line"}

Every job ends with exactly one ``result`` (``added`` for a library_add, ``example`` for an example_data)
or one ``error`` event; the
worker then waits for the next job, keeping its model and the query's encoder features. ``id`` is null
in an error only when the request was too broken to name its job.

Live session (click, see, propagate; sam2/live_session.py, run/session_protocol.py reads these)::

    {"type": "session_open", "id": "s1", "query": "/tmp/x/volume.nrrd", "model": {...}, "frames": {...},
     "slice": 40 | null, "pause_s": 2.0 | null}
    {"type": "session_click", "id": "c1", "session": "s1", "slice": 40, "object": 1,
     "points": [[x, y, 1], [x, y, 0]], "box": [x0, y0, x1, y1] | null, "clear": false}
    {"type": "session_mask", "id": "m1", "session": "s1", "slice": 44, "object": 1, "shape": [rows, columns],
     "bits": "base64 of numpy.packbits(mask, axis=None)"}
    {"type": "session_clear", "id": "x1", "session": "s1", "object": 1 | null, "slice": 40 | null}
    {"type": "session_propagate", "id": "p1", "session": "s1", "out": "/tmp/x/result.nrrd",
     "report": "/tmp/x/report.json", "slice_range": [first, last] | null}
    {"type": "session_status", "id": "q1", "session": "s1"}
    {"type": "session_close", "id": "z1", "session": "s1"}

    {"event": "session", "id": "s1", "session": "s1", "reused": false, "slices": 90, "slice_shape": [rows, columns],
     "axis": "k", "rows": "j", "columns": "i", "plane": "axial", "image_size": 1024, "precision": "fp32",
     "encoded": 0, "frames_encoded": 0, "encode_ms_per_slice": null, "encoding": true,
     "prompts": {"1": {"40": "click", "44": "drawn"}}}
    {"event": "mask", "id": "c1", "session": "s1", "slice": 40, "object": 1, "shape": [rows, columns],
     "bits": "...", "voxels": 812, "object_score": 7.3, "encoded_now": false, "waited_ms": 0.0,
     "encode_ms": 0.0, "decoder_ms": 61.2}
    {"event": "noted", "id": "m1", "session": "s1", "slice": 44, "object": 1, "voxels": 640}
    {"event": "cleared", "id": "x1", "session": "s1", "removed": 2}
    {"event": "closed", "id": "z1", "session": "s1", "frames_encoded": 90}

A session_open hands the volume over once (a file, read as a job's query is; ``frames`` as a job's,
without slice_range); its ``id`` names the session from then on. The worker encodes its slices in the
background, one frame at a time, from ``slice`` (default: the middle) outward, and keeps the features
(memory budget, then the cache's scratch file). Opening another volume (or the same one on another
axis, normalisation or model) closes the open session: there is one at a time, on the worker's one
model. Opening the same volume again (same content, whatever the file) keeps the session, its features
and prompts: the event says ``reused`` and names the session to use. Its ``session`` event is also what
session_status answers (``encoded``: slices encoded so far; ``prompts``: object -> slice -> source).

Coordinates: a slice is the volume's (k, j, i) voxel array with the slicing axis (``axis``) taken out,
so its rows and columns are the two voxel axes left, in that order (``rows``, ``columns``: axis k gives
rows j, columns i; axis j: rows k, columns i; axis i: rows k, columns j). A point [x, y, label] is at
column x, row y of the slice (pixel indices; fractions allowed), label 1 include, 0 exclude; a box is
[x0, y0, x1, y1] with x0 <= x1, y0 <= y1. Masks travel as ``shape`` [rows, columns] and ``bits``: base64
of numpy.packbits over the row-major pixels, first pixel in the high bit (session_protocol.pack_mask and
unpack_mask).

A session_click answers with the object's mask on its slice, from SAM2's prompt encoder and mask decoder
on the slice's cached features (``encoded_now``: the slice had to be encoded first; ``waited_ms``: for the
frame the background was encoding). Points add to the slice's earlier clicks for that object (SAM2
refines its last mask); a box, ``clear``, or a mask drawn there since starts afresh. After a click the
background rests ``pause_s`` seconds, so the next click waits for no frame. A session_mask is a mask the
user drew on a slice: that slice's prompt for the object (an empty one: absent there), and what the next
click there refines. The prompts of a propagation are, per slice and object, the last mask the user saw
or drew (kept verbatim in the result); session_clear forgets them. A session_propagate fills the volume
both ways from every prompted slice, for every prompted object (label value = object id), on the features
already computed, and answers like a job: progress events, then one ``result`` (labels and report written
to ``out`` and ``report``). The session ends on session_close, on a session_open of another volume, on
shutdown, when a job needs another model, and when the client goes away; it leaves no file. The worker is
sequential: a click sent while a job runs is answered after it, by the same model. A client builds these
requests as session_protocol's dataclasses (SessionOpen, SessionClick, ...) and sends them with
WorkerClient.submit; every one ends with one of its events above or one ``error``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..common.errors import InputError, one_line
from ..methods.registry import METHODS as REGISTERED
from ..sam2.build import ModelOptions
from .request import FrameOptions, Request

METHODS = tuple(REGISTERED)
LOG_LEVELS = ("debug", "info", "warning", "error")

_NONE = type(None)
_PATH = (str,)
_INT = (int,)


class ProtocolError(InputError):
    """A request that cannot be understood; ``job_id`` is set when the request named one."""

    def __init__(self, message: str, job_id: str | None = None):
        super().__init__(message)
        self.job_id = job_id


@dataclass(frozen=True, kw_only=True)
class Job(Request):
    """A request with the id its events carry."""

    id: str
    input_notes: tuple[dict, ...] = ()  # what the client did to the inputs, for the report (module doc)

    def to_message(self) -> dict:
        message = {"type": "job", **asdict(self)}
        message["supports"] = [list(pair) for pair in self.supports]
        if self.input_notes:
            message["input_notes"] = [dict(note) for note in self.input_notes]
        else:
            del message["input_notes"]  # an ordinary job's message stays as it was
        return message


@dataclass(frozen=True, kw_only=True)
class LibraryAdd:
    """A labelled case (an accepted review, say) to add to a library, its index synced in the worker."""

    id: str
    library: str
    image: str
    labels: str
    name: str | None = None
    replace: bool = False
    model: ModelOptions = field(default_factory=ModelOptions)

    def to_message(self) -> dict:
        return {"type": "library_add", **asdict(self)}


LIBRARY_ADD_PATHS = ("library", "image", "labels")


@dataclass(frozen=True, kw_only=True)
class ExampleData:
    """The demo's example pair, fetched into the worker's cache; its paths come back in an ``example`` event."""

    id: str

    def to_message(self) -> dict:
        return {"type": "example_data", **asdict(self)}


# The events that end a request (with ``error``): a job's, a library_add's, an example_data's, then a live
# session's requests' (a session_propagate ends with ``result``, as a job does).
END_EVENTS = ("result", "added", "example", "session", "mask", "noted", "cleared", "closed")
SESSION_TYPES = ("session_open", "session_click", "session_mask", "session_clear", "session_propagate",
                 "session_status", "session_close")  # read by session_protocol.parse_request


# ------------------------------------------------------------------------------------ encoding


def encode(message: dict) -> bytes:
    """One protocol line: compact JSON, no embedded newline, UTF-8. A string UTF-8 cannot hold (a lone
    surrogate, from a request that named one) travels as a JSON escape instead of failing the send."""
    try:
        return (json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(message, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


def decode_line(line: bytes | str) -> dict:
    """A JSON object from one line; ProtocolError for anything else."""
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ProtocolError(f"not a JSON line: {single_line(exc, 200)}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"expected a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------ requests


def parse_request(line: bytes | str) -> Job | LibraryAdd | ExampleData | str:
    """A validated Job, LibraryAdd or ExampleData, or "shutdown"; ProtocolError (with the job id when known)
    otherwise."""
    data = decode_line(line)
    kind = data.get("type")
    if kind == "shutdown":
        return "shutdown"
    job_id = data.get("id") if isinstance(data.get("id"), str) else None
    readers = {"job": job_from_message, "library_add": library_add_from_message,
               "example_data": example_data_from_message}
    if kind not in readers:
        raise ProtocolError(f"unknown request type {kind!r}: use 'job', 'library_add', 'example_data', "
                            f"'shutdown' or a live session's {', '.join(SESSION_TYPES)}", job_id)
    try:
        _require_valid_text(data, kind)
        return readers[kind](data)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), job_id) from None


def _require_valid_text(value: Any, where: str) -> None:
    """ProtocolError naming the first string (key or value) that is not valid Unicode: JSON escapes
    can carry a lone surrogate ("\\udcff"), which no file name, log line or event can hold."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]"
        for text, what in ((key, f"a key of {where}"), (item, inner)):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ProtocolError(f"{what} is not valid text: it holds a lone surrogate "
                                        f"(U+{ord(text[exc.start]):04X}); paths and names must be valid "
                                        "Unicode") from None
        _require_valid_text(item, inner)


PATH_FIELDS = ("query", "out", "report", "prompt_labels", "prompts", "library")


def relative_paths(job: Job) -> list[tuple[str, str]]:
    """(field, path) of the job's paths that are not absolute ("out", "supports[0][1]", ...): the worker
    runs in a working folder of its own, so a relative path would name another file than the client meant."""
    named = [(name, getattr(job, name)) for name in PATH_FIELDS]
    named += [(f"supports[{n}][{m}]", p) for n, pair in enumerate(job.supports) for m, p in enumerate(pair)]
    return [(name, path) for name, path in named if path is not None and not os.path.isabs(path)]


def job_from_message(data: dict) -> Job:
    known = {f.name for f in fields(Job)} | {"type"}
    _reject_unknown(data, known, "job")
    job_id = _get(data, "id", _PATH, "job")
    if not job_id:
        raise ProtocolError("job id must not be empty")
    method = _get(data, "method", _PATH, "job")
    if method not in METHODS:
        raise ProtocolError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    values = _get(data, "values", (list, _NONE), "job", None)
    supports = _get(data, "supports", (list,), "job", [])
    notes = _get(data, "input_notes", (list,), "job", [])
    if not all(isinstance(note, dict) for note in notes):
        raise ProtocolError("job.input_notes must be a list of objects")
    return Job(
        id=job_id, method=method,
        query=_get(data, "query", _PATH, "job"),
        out=_get(data, "out", _PATH, "job"),
        report=_get(data, "report", _PATH, "job"),
        prompt_labels=_get(data, "prompt_labels", (str, _NONE), "job", None),
        prompts=_get(data, "prompts", (str, _NONE), "job", None),
        values=None if values is None else tuple(_int_list(values, "values")),
        supports=tuple(_support_pair(p, n) for n, p in enumerate(supports)),
        library=_get(data, "library", (str, _NONE), "job", None),
        model=_options(ModelOptions, _get(data, "model", (dict,), "job", {}), "model"),
        frames=_frame_options(_get(data, "frames", (dict,), "job", {})),
        params=_get(data, "params", (dict,), "job", {}),
        preset=_get(data, "preset", (str, _NONE), "job", None),
        input_notes=tuple(notes),
    )


def library_add_from_message(data: dict) -> LibraryAdd:
    _reject_unknown(data, {f.name for f in fields(LibraryAdd)} | {"type"}, "library_add")
    add = LibraryAdd(id=_get(data, "id", _PATH, "library_add"),
                     **{k: _get(data, k, _PATH, "library_add") for k in LIBRARY_ADD_PATHS},
                     name=_get(data, "name", (str, _NONE), "library_add", None),
                     replace=_get(data, "replace", (bool,), "library_add", False),
                     model=_options(ModelOptions, _get(data, "model", (dict,), "library_add", {}), "model"))
    relative = [k for k in LIBRARY_ADD_PATHS if not os.path.isabs(getattr(add, k))]
    if not add.id or relative:
        raise ProtocolError("library_add needs an id and absolute paths" + (f" (got {relative[0]} "
                            f"'{getattr(add, relative[0])}')" if relative else ""))
    return add


def example_data_from_message(data: dict) -> ExampleData:
    _reject_unknown(data, {"type", "id"}, "example_data")
    request = ExampleData(id=_get(data, "id", _PATH, "example_data"))
    if not request.id:
        raise ProtocolError("example_data needs an id")
    return request


def _frame_options(data: dict) -> FrameOptions:
    options = _options(FrameOptions, data, "frames")
    for name in ("frame", "component"):
        value = getattr(options, name)
        if value is not None and (not _is_int(value) or value < 0):
            raise ProtocolError(f"frames.{name} must be a whole number from 0")
    if options.slice_range is None:
        return options
    rng = _int_list(options.slice_range, "frames.slice_range")
    if len(rng) != 2 or not 0 <= rng[0] <= rng[1]:
        raise ProtocolError("frames.slice_range must be [first, last] with 0 <= first <= last")
    return replace(options, slice_range=(rng[0], rng[1]))


_OPTION_TYPES: dict[type, dict[str, tuple]] = {
    ModelOptions: {"name": _PATH, "checkpoint": (str, _NONE), "config": (str, _NONE),
                   "image_size": (int, _NONE), "device": _PATH, "offline": (bool,), "random_weights": (bool,),
                   "seed": _INT, "threads": (int, _NONE), "precision": (str, _NONE)},
    FrameOptions: {"axis": _PATH, "normalization": _PATH, "per_slice_normalization": (bool,),
                   "slice_range": (list, _NONE), "frame": (int, _NONE), "component": (int, _NONE),
                   "series": (str, _NONE)},
}


def _options(cls, data: dict, where: str):
    types = _OPTION_TYPES[cls]
    _reject_unknown(data, set(types), where)
    values = {k: _get(data, k, t, where, None) for k, t in types.items() if k in data}
    return cls(**values)


def _support_pair(pair: Any, n: int) -> tuple[str, str]:
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
        raise ProtocolError(f"supports[{n}] must be [image path, labels path]")
    return pair[0], pair[1]


def _int_list(items: Any, where: str) -> list[int]:
    if not isinstance(items, (list, tuple)) or not all(_is_int(v) for v in items):
        raise ProtocolError(f"{where} must be a list of integers")
    return [int(v) for v in items]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_unknown(data: dict, known: set, where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProtocolError(f"unknown key(s) in {where}: {', '.join(unknown)}")


_MISSING = object()


def _get(data: dict, key: str, types: tuple, where: str, default: Any = _MISSING) -> Any:
    """data[key] checked against ``types`` (bool never passes for int); missing -> default or error."""
    if key not in data:
        if default is _MISSING:
            raise ProtocolError(f"{where} is missing the key '{key}'")
        return default
    value = data[key]
    ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in types)
    if not ok:
        names = " or ".join("null" if t is _NONE else t.__name__ for t in types)
        raise ProtocolError(f"{where}.{key} must be {names}, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------ events


def ready(pid: int, version: str, devices: dict | None = None) -> dict:
    """``devices``: what the worker's torch sees (CUDA GPUs with free memory, MPS), so the panel can
    say it without importing torch into Slicer's own process."""
    return {"event": "ready", "pid": pid, "version": version, "devices": devices or {"cuda": [], "mps": False}}


def describe_devices(devices: dict) -> str:
    """'cuda: NVIDIA H200 (139.2 of 139.8 GiB free)', 'Apple MPS' or 'CPU only'."""
    gpus = [f"{g['name']} ({g['free_gib']:.1f} of {g['total_gib']:.1f} GiB free)" for g in devices.get("cuda", [])]
    if gpus:
        return "cuda: " + "; ".join(gpus)
    return "Apple MPS" if devices.get("mps") else "CPU only (no CUDA GPU or MPS seen by PyTorch)"


def progress(job_id: str, stage: str, done: int, total: int) -> dict:
    return {"event": "progress", "id": job_id, "stage": stage, "done": int(done), "total": int(total)}


def log(level: str, message: str) -> dict:
    return {"event": "log", "level": level if level in LOG_LEVELS else "info", "message": single_line(message)}


def result(job_id: str, labels: str, report: str, seconds: float, frames_encoded: int, session_reused: bool) -> dict:
    return {"event": "result", "id": job_id, "labels": labels, "report": report, "seconds": round(seconds, 3),
            "frames_encoded": int(frames_encoded), "session_reused": bool(session_reused)}


def added(job_id: str, case: str, library: str, message: str) -> dict:
    return {"event": "added", "id": job_id, "case": case, "library": library, "message": single_line(message)}


def example(job_id: str, query: str, support: str, support_labels: str, query_case: str, support_case: str,
            names: dict[int, str]) -> dict:
    """The example pair's files (in the worker's cache) and its structure names, label value -> name."""
    return {"event": "example", "id": job_id, "query": query, "support": support, "support_labels": support_labels,
            "query_case": query_case, "support_case": support_case,
            "names": {str(int(v)): single_line(n, 200) for v, n in names.items()}}


def error(job_id: str | None, message: str) -> dict:
    return {"event": "error", "id": job_id, "message": single_line(message)}


_EVENT_KEYS = {
    "ready": {"pid": _INT},
    "progress": {"id": _PATH, "stage": _PATH, "done": _INT, "total": _INT},
    "log": {"level": _PATH, "message": _PATH},
    "result": {"id": _PATH, "labels": _PATH, "report": _PATH, "seconds": (int, float), "frames_encoded": _INT},
    "added": {"id": _PATH, "case": _PATH, "library": _PATH, "message": _PATH},
    "example": {"id": _PATH, "query": _PATH, "support": _PATH, "support_labels": _PATH, "query_case": _PATH,
                "support_case": _PATH, "names": (dict,)},
    "error": {"id": (str, _NONE), "message": _PATH},
    "session": {"id": _PATH, "session": _PATH, "slices": _INT, "slice_shape": (list,), "axis": _PATH},
    "mask": {"id": _PATH, "session": _PATH, "slice": _INT, "object": _INT, "shape": (list,), "bits": _PATH,
             "encoded_now": (bool,)},
    "noted": {"id": _PATH, "session": _PATH, "slice": _INT, "object": _INT},
    "cleared": {"id": _PATH, "session": _PATH, "removed": _INT},
    "closed": {"id": _PATH, "session": _PATH},
}


def parse_event(line: bytes | str) -> dict:
    """A validated event from one line of the worker's stdout; ProtocolError otherwise."""
    data = decode_line(line)
    kind = data.get("event")
    if kind not in _EVENT_KEYS:
        raise ProtocolError(f"unknown event {kind!r}")
    for key, types in _EVENT_KEYS[kind].items():
        _get(data, key, types, f"{kind} event")
    return data


def single_line(message: Any, limit: int = 600) -> str:
    """A message on one line, cut at ``limit`` characters: an event is one short line."""
    text = one_line(message)
    return text if len(text) <= limit else text[: limit - 3] + "..."
