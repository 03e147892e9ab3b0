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
     "params": {...}}                                                 # method parameters
    {"type": "library_add", "id": "a1", "library": "/data/library", "image": "/x/case.nrrd",
     "labels": "/x/case.seg.nrrd", "name": "case" | null, "replace": false, "model": {...}}
    {"type": "shutdown"}

A ``library_add`` (library/add.add_case) adds one labelled case to a library and syncs the indexes it
already has, with the features the worker loads for them (SAM2's: the ``model`` given, kept warm).

``model``, ``frames`` and ``params`` and every key inside them are optional (defaults above);
``params`` holds the fields of the method's ``Params`` (methods/<method>.py), nested groups as
objects (guided: ``{"prior": "sam2", "fewshot": {"top_k": 2}, "lora": {"steps": 50}}``). A job is a
Request (run/request.py) with an id: the worker hands it to the Runner as it is.

Events (stdout)::

    {"event": "ready", "pid": 123, "version": "0.1.0",
     "devices": {"cuda": [{"name": "NVIDIA H200", "free_gib": 139.2, "total_gib": 139.8}], "mps": false}}
    {"event": "progress", "id": "j1", "stage": "encode query" | "propagate forward" | ..., "done": 3, "total": 8}
    {"event": "log", "level": "info" | "warning" | "error", "message": "..."}
    {"event": "result", "id": "j1", "labels": path, "report": path, "seconds": 2.1,
     "frames_encoded": 0, "session_reused": true}
    {"event": "added", "id": "a1", "case": "case", "library": path, "message": "one line"}
    {"event": "error", "id": "j1" | null, "message": "one line"}

Every job ends with exactly one ``result`` (``added`` for a library_add) or one ``error`` event; the
worker then waits for the next job, keeping its model and the query's encoder features. ``id`` is null
in an error only when the request was too broken to name its job.
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

    def to_message(self) -> dict:
        message = {"type": "job", **asdict(self)}
        message["supports"] = [list(pair) for pair in self.supports]
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


def parse_request(line: bytes | str) -> Job | LibraryAdd | str:
    """A validated Job or LibraryAdd, or "shutdown"; ProtocolError (with the job id when known) otherwise."""
    data = decode_line(line)
    kind = data.get("type")
    if kind == "shutdown":
        return "shutdown"
    job_id = data.get("id") if isinstance(data.get("id"), str) else None
    if kind not in ("job", "library_add"):
        raise ProtocolError(f"unknown request type {kind!r}: use 'job', 'library_add' or 'shutdown'", job_id)
    try:
        _require_valid_text(data, kind)
        return job_from_message(data) if kind == "job" else library_add_from_message(data)
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


def error(job_id: str | None, message: str) -> dict:
    return {"event": "error", "id": job_id, "message": single_line(message)}


_EVENT_KEYS = {
    "ready": {"pid": _INT},
    "progress": {"id": _PATH, "stage": _PATH, "done": _INT, "total": _INT},
    "log": {"level": _PATH, "message": _PATH},
    "result": {"id": _PATH, "labels": _PATH, "report": _PATH, "seconds": (int, float), "frames_encoded": _INT},
    "added": {"id": _PATH, "case": _PATH, "library": _PATH, "message": _PATH},
    "error": {"id": (str, _NONE), "message": _PATH},
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
