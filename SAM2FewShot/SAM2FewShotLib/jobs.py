"""Running worker jobs on the engine, with the model and the query's encoder features kept warm.

A JobRunner lives as long as the worker process. It keeps one loaded predictor (a job asking for
another model replaces it) and a few VolumeSessions, keyed by the query file's content, so a
second run on the same volume (after an edit, or with another method) encodes nothing again.
Sessions are keyed by content, not by path, because the client writes every job's files into a
fresh private folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from .errors import InputError
from .normalization import Normalization
from .protocol import Job, ModelOptions
from .protocol import result as result_event

from .progress import ProgressFn  # noqa: F401 (re-exported)
MAX_SESSIONS = 3
_CHUNK = 8 << 20


class JobRunner:
    """Turns validated jobs into engine calls; owns the warm model and sessions."""

    def __init__(self, max_sessions: int = MAX_SESSIONS):
        self.max_sessions = max(1, int(max_sessions))
        self._model_key: Optional[tuple] = None
        self._predictor = None
        self._model_info: dict = {}
        self._sessions: "OrderedDict[tuple, object]" = OrderedDict()
        self._digests: dict[tuple, str] = {}

    def run(self, job: Job, progress: ProgressFn) -> dict:
        """Run one job, write its label file and report; the result event to send back."""
        start = time.perf_counter()
        check_inputs(job)
        check_outputs(job)
        if job.method == "registration":
            labels, report = run_registration(job, progress)
            reused = False
        else:
            normalization = Normalization.parse(job.frames.normalization,
                                                per_slice=job.frames.per_slice_normalization)
            predictor = self._predictor_for(job.model, progress)
            session, reused = self._session_for(job, predictor, normalization)
            frame_range = checked_frame_range(job, session.num_slices)
            run = {"propagate": run_propagate, "matched-support": run_matched_support, "guided": run_guided,
                   "retrieval": run_retrieval}[job.method]
            labels, report = run(job, session, progress, frame_range)
            report["model"] = dict(self._model_info)
        report["inputs"] = {"query": job.query, "prompt_labels": job.prompt_labels or "",
                            "supports": [list(pair) for pair in job.supports], "library": job.library or ""}
        report["worker"] = {"session_reused": reused, "job_id": job.id}
        write_outputs(labels, report, job)
        encoded = int(report.get("timing", {}).get("frames_encoded", 0))
        return result_event(job.id, job.out, job.report, time.perf_counter() - start, encoded, reused)

    def forget(self) -> None:
        """Drop the model and all sessions (after an out-of-memory error), freeing what can be freed."""
        import gc

        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        self._predictor, self._model_key, self._model_info = None, None, {}
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is imported by every model job
            pass

    # ---------------------------------------------------------------------------- warm state

    def _predictor_for(self, options: ModelOptions, progress: ProgressFn):
        key = options.key()
        if key == self._model_key:
            return self._predictor
        self.forget()  # one model at a time: its sessions hold its features
        progress("model", 0, 1)
        self._predictor, self._model_info = load_model(options, progress)
        self._model_key = key
        progress("model", 1, 1)
        return self._predictor

    def _session_for(self, job: Job, predictor, normalization: Normalization):
        """The warm session for this query, axis and normalisation, or a new one (evicting the oldest)."""
        from .session import VolumeSession
        from .volume_io import read_volume

        key = (self._digest(Path(job.query)), job.frames.axis.lower(), normalization, self._model_key)
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key], True
        session = VolumeSession(predictor, read_volume(job.query), job.frames.axis, normalization)
        self._sessions[key] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)[1].close()
        return session, False

    def _digest(self, path: Path) -> str:
        """Content hash of a volume file or DICOM folder, remembered per (path, size, mtime)."""
        if not path.exists():
            raise InputError(f"{path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stamp = (str(path.resolve()),) + tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        if stamp not in self._digests:
            self._digests[stamp] = content_digest(path, files)
        return self._digests[stamp]


def content_digest(root: Path, files: list[Path]) -> str:
    digest = hashlib.blake2b(digest_size=20)
    try:
        for f in files:
            digest.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
            with f.open("rb") as stream:
                for block in iter(lambda: stream.read(_CHUNK), b""):
                    digest.update(block)
    except OSError as exc:
        raise InputError(f"cannot read {root}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def load_model(options: ModelOptions, progress: ProgressFn):
    """The predictor and its report entry; registered weights are fetched with progress events."""
    from . import models
    from .cli import load_model as load_from_args

    if not options.random_weights and options.checkpoint is None:
        models.download(options.name, offline=options.offline, progress=progress)
    args = SimpleNamespace(model=options.name, checkpoint=Path(options.checkpoint) if options.checkpoint else None,
                           config=options.config, image_size=options.image_size, device=options.device,
                           offline=options.offline, random_weights=options.random_weights, seed=options.seed)
    return load_from_args(args)


# ---------------------------------------------------------------------------- the methods


def run_propagate(job: Job, session, progress: ProgressFn, frame_range):
    from .segment_propagate import prompts_from_labels, segment_propagate
    from .volume_io import read_labels

    prompt_labels = read_labels(job.prompt_labels, reference=session.volume)
    prompts = prompts_from_labels(session, prompt_labels, job.values)
    return segment_propagate(session, prompts, prompt_labels.segments, progress=progress, frame_range=frame_range)


def run_matched_support(job: Job, session, progress: ProgressFn, frame_range):
    from .segment_fewshot import FewShotParams, segment_fewshot

    params = dataclass_params(FewShotParams, {"seed": job.model.seed, **job.params})
    return segment_fewshot(session, read_supports(job), params, progress=progress, frame_range=frame_range)


def run_guided(job: Job, session, progress: ProgressFn, frame_range):
    from .guided import GuidedParams, segment_guided

    params = dataclass_params(GuidedParams, job.params, exclude=("fewshot",))
    return segment_guided(session, read_supports(job), params, progress=progress, frame_range=frame_range)


def run_retrieval(job: Job, session, progress: ProgressFn, frame_range):
    from .library import open_library
    from .segment_retrieval import RetrievalParams, library_features, segment_retrieval

    params = dataclass_params(RetrievalParams, job.params, exclude=("normalization",))
    params = dataclasses.replace(params, normalization=session.normalization)
    predictor = session.predictor
    features = library_features(params.features, predictor, predictor.device, offline=job.model.offline,
                                random_weights=job.model.random_weights, seed=job.model.seed, progress=False)
    return segment_retrieval(session, open_library(job.library), params, features, progress=progress,
                             frame_range=frame_range)


def run_registration(job: Job, progress: ProgressFn):
    """The weight-free registration prior (multi-atlas fusion); needs no model."""
    import inspect

    try:
        from .label_fusion import registration_segment
    except ImportError:
        raise InputError("the registration method is not available in this version of the engine") from None
    from .volume_io import read_volume

    if job.frames.slice_range is not None:
        raise InputError("the registration method segments the whole volume: it takes no slice range")
    known = set(inspect.signature(registration_segment).parameters) - {"query", "supports", "progress", "should_cancel"}
    unknown = sorted(set(job.params) - known)
    if unknown:
        raise InputError(f"unknown registration parameter(s) {', '.join(unknown)}: known are {', '.join(sorted(known))}")
    return registration_segment(read_volume(job.query), read_supports(job), progress=progress, **job.params)


def read_supports(job: Job) -> list:
    from .volume_io import read_labels, read_volume

    supports = []
    for image_path, labels_path in job.supports:
        image = read_volume(image_path)
        supports.append((image, read_labels(labels_path, reference=image)))
    return supports


def dataclass_params(cls, params: dict, exclude: tuple[str, ...] = ()):
    """``cls(**params)`` with unknown keys and wrong value types refused in one clear line.

    ``exclude`` names fields that are no plain JSON values (nested options): they keep their defaults.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in exclude}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise InputError(f"unknown parameter(s) {', '.join(unknown)}: known are {', '.join(defaults)}")
    for name, value in params.items():
        want = float if defaults[name] is None else type(defaults[name])  # optional numbers default to None
        if value is None and defaults[name] is None:
            continue
        ok = isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
        if not ok and not (want is float and isinstance(value, int) and not isinstance(value, bool)):
            raise InputError(f"parameter {name} must be a {want.__name__}, got {value!r}")
    return cls(**params)


def checked_frame_range(job: Job, num_slices: int) -> Optional[tuple[int, int]]:
    rng = job.frames.slice_range
    if rng is not None and not rng[1] < num_slices:
        raise InputError(f"slice range {rng[0]}..{rng[1]} is outside 0..{num_slices - 1}")
    return rng


# ---------------------------------------------------------------------------- inputs and outputs


def check_inputs(job: Job) -> None:
    """Fail before loading a model when an input file is missing."""
    paths = [job.query] + ([job.prompt_labels] if job.prompt_labels else []) + [p for pair in job.supports for p in pair]
    for path in paths:
        if not Path(path).exists():
            raise InputError(f"{path} does not exist")


def check_outputs(job: Job) -> None:
    """Fail before any work when the label file or the report cannot be written."""
    from .cli import check_writable
    from .volume_io import SEG_NRRD, WRITE_SUFFIXES, image_suffix, sidecar_path

    allowed = WRITE_SUFFIXES + (SEG_NRRD,)
    if image_suffix(job.out) not in allowed:
        raise InputError(f"cannot write {job.out}: use one of {', '.join(allowed)}")
    check_writable(Path(job.out))
    check_writable(Path(job.report))
    taken = {Path(job.out).resolve()} | ({sidecar_path(job.out).resolve()} if image_suffix(job.out) != SEG_NRRD else set())
    if Path(job.report).resolve() in taken:
        raise InputError(f"the report {job.report} would overwrite the label file or its JSON sidecar")


def write_outputs(labels, report: dict, job: Job) -> None:
    """Labels, then the report; both are atomic and a failed report removes the labels again."""
    from .json_io import write_json_atomic
    from .volume_io import SEG_NRRD, image_suffix, sidecar_path, write_labels

    write_labels(labels, job.out)
    try:
        write_json_atomic(report, job.report)
    except BaseException:
        Path(job.out).unlink(missing_ok=True)
        if image_suffix(job.out) != SEG_NRRD:
            sidecar_path(job.out).unlink(missing_ok=True)
        raise
