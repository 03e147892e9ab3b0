"""The one runner: a Request in, the label map and the report out, for every front end.

A Runner checks everything it can before any loading (method, inputs, parameters, outputs), loads
the model once (a request asking for another model replaces it), and keeps a few VolumeSessions
warm, keyed by the query file's content, so a second run on the same volume (after an edit, or
with another method) encodes nothing again. The worker keeps one for its whole life; the CLI uses
one per command; the bench one per benchmark. Sessions are keyed by content, not by path, because
the Slicer client writes every job's files into a fresh private folder. The worker's live session (clicks)
holds one of them (``hold_session``): a job on its volume reuses the features its clicks and background
encoding computed, and a session opened on a volume a job ran on starts with that job's features.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from ..common.cache import require_cache
from ..common.context import RunContext
from ..common.errors import InputError
from ..common.progress import LOAD_MODEL, ProgressFn
from ..io.normalization import Normalization
from ..io.slicing import prompt_plane, slicing_axis
from ..methods.presets import get_preset
from ..methods.registry import LIBRARY, PROMPTS, SUPPORTS, MethodSpec, get_method
from ..sam2.build import ModelOptions
from .input_files import check_input_files
from .outputs import check_outputs
from .request import FrameOptions, Request

MAX_SESSIONS = 3
log = logging.getLogger(__name__)


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


class Runner:
    """Runs requests; owns the warm model and query sessions between them."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, save_support_features: bool = True):
        self.max_sessions = max(1, int(max_sessions))
        self.save_support_features = save_support_features  # kept in the user cache between runs
        self._supports = None  # the loaded model's SupportFeatureStore, shared by its sessions
        self._model_key: tuple | None = None
        self._predictor = None
        self._model_info: dict = {}
        self._sessions: OrderedDict[tuple, object] = OrderedDict()
        self._held = None  # the live session's VolumeSession: never evicted, dropped by let_go
        self._digests: dict[tuple, str] = {}
        self._notes: dict[tuple, list[dict]] = {}  # what was repaired in a query, by its content and series
        self._threads: int | None = None  # torch CPU threads the runs use
        self._lock = threading.RLock()  # prepare() may read the next query while a run computes

    def run(self, request: Request, progress: ProgressFn | None = None,
            should_cancel: Callable[[], bool] | None = None):
        """(LabelMap, report) for the request. Everything is checked and every input read before a
        model is loaded: a bad input fails in a second, not after a download."""
        from ..methods.common import MethodInputs

        progress = progress or _no_progress
        spec, params = check_request(request)
        normalization = Normalization.parse(request.frames.normalization,
                                            per_slice=request.frames.per_slice_normalization)
        with self._lock:
            key = self._session_key(request, normalization) if spec.needs_model else None
            query = self._query(request, key)
        prompt_labels = read_prompt_labels(request, query)
        request = with_axis(request, frames_axis(request, query, prompt_labels))
        key = self._session_key(request, normalization) if spec.needs_model else None
        frame_range = checked_frame_range(request.frames.slice_range,
                                          query.array.shape[slicing_axis(query, request.frames.axis)])
        supports, notes = read_supports(request)
        library = read_library(request)
        prompts = read_prompts(request, query)
        session, reused = None, False
        if spec.needs_model:
            session, reused = self._session_for(key, query, request, normalization, progress)
        inputs = MethodInputs(
            query=query, session=session, supports=supports, library=library, prompt_labels=prompt_labels,
            values=request.values, prompts=prompts, axis=request.frames.axis, normalization=normalization,
            model=request.model, context=RunContext(progress, should_cancel, frame_range))
        labels, report = spec.load().run(inputs, params)
        report["model"] = dict(self._model_info) if spec.needs_model else dict(NO_MODEL)
        if spec.needs_model:
            report["model"]["threads"] = self._threads
        report["inputs"] = {"query": request.query, "prompt_labels": request.prompt_labels or "",
                            "prompts": request.prompts or "", "supports": [list(p) for p in request.supports],
                            "library": request.library or ""}
        notes = self._notes.get((self._digest(Path(request.query)), request.frames.series), []) + notes
        notes = [dict(n) for n in getattr(request, "input_notes", ())] + notes  # a worker Job's, from the client
        if notes:
            report["input_notes"] = notes
        report["run"] = {"session_reused": reused}
        if request.preset:
            report["preset"] = get_preset(request.preset).as_report()
        return labels, report

    def prepare(self, request: Request) -> None:
        """Read, check and normalise the request's query into a warm session ahead of its run (a
        cohort prefetches the next query while the model works); a no-op before a model is loaded
        or for a method without one. Failures are left for the run itself to report."""
        try:
            spec = get_method(request.method)
            if not spec.needs_model or self._model_key != request.model.key():
                return
            normalization = Normalization.parse(request.frames.normalization,
                                                per_slice=request.frames.per_slice_normalization)
            with self._lock:
                query = self._query(request, self._session_key(request, normalization))
                request = with_axis(request, frames_axis(request, query, None))  # as run() will name it
                key = self._session_key(request, normalization)
                if key not in self._sessions:
                    self._session_for(key, query, request, normalization, _no_progress)
        except Exception:  # noqa: BLE001 - the run reads it again and says what is wrong
            log.debug("prefetch of %s failed", request.query, exc_info=True)

    def model(self, options: ModelOptions, progress: ProgressFn | None = None):
        """The loaded predictor for these options (loaded now unless it is the warm one) and its report entry.

        Torch's CPU threads: the count the options name, else the cores other work leaves free when
        the model loads (sam2/build.load_model)."""
        import torch

        key = options.key()
        if key != self._model_key:
            progress = progress or _no_progress
            self.forget()  # one model at a time: its sessions hold its features
            from ..sam2.build import load_model
            from ..sam2.support_store import SupportFeatureStore

            progress(LOAD_MODEL, 0, 1)
            self._predictor, self._model_info = load_model(options, progress)
            self._model_key = key
            budget = support_features_budget() if self.save_support_features else 0
            self._supports = SupportFeatureStore(self._predictor, support_features_folder() if budget else None,
                                                 disk_budget=budget)
            progress(LOAD_MODEL, 1, 1)
        elif options.threads:  # the warm model, with the count this request names
            torch.set_num_threads(options.threads)
        self._threads = torch.get_num_threads()
        return self._predictor, dict(self._model_info)

    def session(self, query: str, frames: FrameOptions = FrameOptions(), model: ModelOptions = ModelOptions(),
                progress: ProgressFn | None = None):
        """The warm session of a query (created, nothing encoded yet, when there is none): the one a
        request with this query, frames and model runs on."""
        request = Request(method="propagate", query=query, frames=frames, model=model)
        normalization = Normalization.parse(frames.normalization, per_slice=frames.per_slice_normalization)
        volume = self._query(request, self._session_key(request, normalization))
        request = with_axis(request, frames_axis(request, volume, None))  # as run() will name it
        key = self._session_key(request, normalization)
        return self._session_for(key, volume, request, normalization, progress or _no_progress)[0]

    def hold_session(self, query: str, frames: FrameOptions, model: ModelOptions,
                     progress: ProgressFn | None = None):
        """``session()``, kept warm whatever other volumes jobs run on until ``let_go``: the live session's."""
        session = self.session(query, frames, model, progress)
        self._held = session
        return session

    def let_go(self, session) -> None:
        """The live session ended: its VolumeSession is closed and forgotten (features and scratch freed)."""
        with self._lock:
            if self._held is session:
                self._held = None
            for key in [k for k, s in self._sessions.items() if s is session]:
                del self._sessions[key]
        session.close()

    def forget_sessions(self) -> None:
        """Close every query session (features in memory and on disk); the model stays loaded."""
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        self._held = None

    def forget_supports(self) -> None:
        """Drop the support features held in memory (saved ones stay saved)."""
        if self._supports is not None:
            self._supports.drop()

    def forget(self) -> None:
        """Drop the model and all sessions (after an out-of-memory error), freeing what can be freed."""
        import gc

        self.forget_sessions()
        if self._supports is not None:
            self._supports.close()  # complete support sets are saved for the next run
        self._predictor, self._model_key, self._model_info, self._supports = None, None, {}, None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is imported by every model run
            pass

    close = forget

    def _query(self, request: Request, key: tuple | None):
        """The request's query volume: a warm session's when one holds this file's content (whatever its
        axis or normalisation: the volume is the same), else read and checked now."""
        if key is not None:
            for other, session in self._sessions.items():
                if other[:4] == key[:4]:  # file content, frame, component, DICOM series
                    return session.volume
        return self._read_query(request.query, request.frames)

    def _session_key(self, request: Request, normalization: Normalization) -> tuple:
        return (self._digest(Path(request.query)), request.frames.frame, request.frames.component,
                request.frames.series, request.frames.axis.lower(), normalization, request.model.key())

    def _session_for(self, key: tuple, query, request: Request, normalization: Normalization, progress: ProgressFn):
        """The warm session under ``key``, or a new one on ``query`` (evicting the oldest); loads the model."""
        predictor, _ = self.model(request.model, progress)  # a new model drops every session
        with self._lock:
            return self._warm_session(key, predictor, query, request, normalization)

    def _warm_session(self, key: tuple, predictor, query, request: Request, normalization: Normalization):
        from ..sam2.session import VolumeSession

        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key], True
        session = VolumeSession(predictor, query, request.frames.axis, normalization, supports=self._supports)
        self._sessions[key] = session
        while len(self._sessions) > self.max_sessions:
            oldest = next((k for k, s in self._sessions.items() if k != key and s is not self._held), None)
            if oldest is None:
                break
            self._sessions.pop(oldest).close()
        return session, False

    def _read_query(self, path: str, frames: FrameOptions = FrameOptions()):
        """The query volume (its frame and component, for a 4D or vector file), checked (and its NaN
        repaired, noted once per file content)."""
        from ..io.checks import checked_image
        from ..io.volume_io import read_volume

        notes: list[dict] = []  # a DICOM series put on a regular grid (io/dicom_series.py)
        volume, note = checked_image(read_volume(path, frames.frame, frames.component, frames.series, notes),
                                     f"the query {path}")
        self._notes[(self._digest(Path(path)), frames.series)] = notes + ([note] if note else [])
        return volume

    def _digest(self, path: Path) -> str:
        """Content hash of a volume file or DICOM folder, remembered per (path, size, mtime)."""
        if not path.exists():
            raise InputError(f"{path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stamp = (str(path.resolve()),) + tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        if stamp not in self._digests:
            self._digests[stamp] = content_digest(path, files)
        return self._digests[stamp]


def support_features_folder():
    from ..common.cache import cache_dir

    return cache_dir() / "support_features"


SUPPORT_FEATURES_ENV = "SAM2FEWSHOT_SUPPORT_FEATURES_GB"  # disk kept for saved support features (0: none)


def support_features_budget() -> int:
    """Bytes of support features kept between runs: $SAM2FEWSHOT_SUPPORT_FEATURES_GB, default 2 GB."""
    import os

    text = os.environ.get(SUPPORT_FEATURES_ENV, "2")
    try:
        return max(0, int(float(text) * (1 << 30)))
    except ValueError:
        raise InputError(f"{SUPPORT_FEATURES_ENV} must be a number of gigabytes, got '{text}'") from None


NO_MODEL = {"name": None, "weights": None, "config": None, "image_size": None, "device": "cpu"}


def check_request(request: Request) -> tuple[MethodSpec, object]:
    """The method and its typed parameters, once everything that can be checked without loading is."""
    spec = get_method(request.method)
    given = {PROMPTS: request.prompt_labels is not None or request.prompts is not None,
             SUPPORTS: bool(request.supports), LIBRARY: request.library is not None}
    if not given[spec.inputs]:
        raise InputError({PROMPTS: "propagate needs prompts: a label file with masks on some slices, or a "
                                   "JSON file of boxes and points",
                          SUPPORTS: f"{spec.key} needs at least one labelled support case (image and labels)",
                          LIBRARY: f"{spec.key} needs a library: a folder of labelled cases"}[spec.inputs])
    extra = [kind for kind, present in given.items() if present and kind != spec.inputs]
    if extra:
        raise InputError(f"{spec.key} is conditioned by {spec.inputs}, not by {' or '.join(extra)}: give one of them")
    if request.frames.slice_range is not None:
        first, last = request.frames.slice_range
        if not spec.slice_range:
            raise InputError(f"the {spec.key} method segments the whole volume: it takes no slice range")
        if not 0 <= first <= last:
            raise InputError(f"slice range {first}..{last}: give 0 <= first <= last")
    Normalization.parse(request.frames.normalization)  # a bad normalisation fails here, not after loading
    if spec.needs_model:
        check_model_options(request.model)
    params = spec.params(request.params, seed=request.model.seed)
    if request.preset and get_preset(request.preset).method != spec.key:
        raise InputError(f"the preset {request.preset} runs the {get_preset(request.preset).method} method, "
                         f"not {spec.key}")
    files = check_input_files(request)
    if spec.needs_model:
        require_cache()  # weights, saved support features and scratch files live there
    if request.out is not None:
        check_outputs(request.out, request.report, files)
    return spec, params


def check_model_options(options: ModelOptions) -> None:
    """A model name or image size that cannot work fails before anything is loaded or downloaded."""
    from ..common.errors import ModelError
    from ..sam2.build import size_overrides
    from ..sam2.models import REGISTRY

    if options.threads is not None and options.threads < 1:
        raise InputError(f"threads must be at least 1, got {options.threads}")
    if options.random_weights and options.checkpoint:
        raise InputError("random weights and a checkpoint file exclude each other: give one of them")
    if options.name not in REGISTRY:
        raise ModelError(f"unknown model '{options.name}': known models are {', '.join(REGISTRY)}")
    if options.image_size is not None:
        size_overrides(options.image_size)


def checked_frame_range(slice_range: tuple[int, int] | None, num_slices: int) -> tuple[int, int] | None:
    if slice_range is not None and not slice_range[1] < num_slices:
        raise InputError(f"slice range {slice_range[0]}..{slice_range[1]} is outside 0..{num_slices - 1}")
    return slice_range


def read_supports(request: Request) -> tuple[list, list[dict]]:
    """The labelled support cases (SupportCase, knowing their files), each label file read onto its own
    (checked) image's grid, and what was repaired in them."""
    from ..io.checks import checked_image
    from ..io.volume import SupportCase
    from ..io.volume_io import read_labels, read_volume

    supports, notes = [], []
    for index, (image_path, labels_path) in enumerate(request.supports):
        image, note = checked_image(read_volume(image_path, notes=notes), f"support image {image_path}")
        labels = read_labels(labels_path, reference=image)
        supports.append(SupportCase(image, labels, (image_path, labels_path), index))
        notes += [note] if note else []
    return supports, notes


def read_library(request: Request):
    if request.library is None:
        return None
    from ..library.cases import open_library

    return open_library(Path(request.library))


def read_prompt_labels(request: Request, query):
    """The prompt label file on the query's grid, with the label values the request names in it."""
    if request.prompt_labels is None:
        return None
    from ..io.volume_io import read_labels

    labels = read_labels(request.prompt_labels, reference=query)
    array = labels.volume.array
    if not array.any() and request.prompts is None:  # beside a prompts file: the names of its labels' segments
        raise InputError(f"the prompt label file {request.prompt_labels} has no labelled voxel")
    missing = [v for v in request.values or () if not (array == v).any()]
    if missing:
        present = [s.value for s in labels.segments if (array == s.value).any()]
        raise InputError(f"label value {missing[0]} does not exist in the prompt labels (values: {present})")
    return labels


def with_axis(request: Request, axis: str) -> Request:
    """The request with its frames' slicing axis named ``axis`` (the same request when it already is)."""
    if axis == request.frames.axis:
        return request
    return dataclasses.replace(request, frames=dataclasses.replace(request.frames, axis=axis))


def frames_axis(request: Request, query, prompt_labels) -> str:
    """The request's slicing axis as one name per voxel axis: "auto" when it is the acquisition axis;
    with "auto" and prompt masks, the plane they were drawn in (io/slicing.prompt_plane)."""
    choice = request.frames.axis
    if choice.lower() == "auto" and prompt_labels is not None:
        choice = prompt_plane(query, prompt_labels.volume.array)
    return "auto" if slicing_axis(query, choice) == slicing_axis(query, "auto") else choice


def read_prompts(request: Request, query) -> list:
    """Boxes and points from the request's prompts file, checked against the query's slices."""
    if request.prompts is None:
        return []
    from ..methods.propagate import read_prompts_file

    return read_prompts_file(request.prompts, slicing_axis(query, request.frames.axis), query.array.shape)


def content_digest(root: Path, files: list[Path]) -> str:
    """The digest of a volume's file, or of a DICOM folder's files: the same content, the same session."""
    from ..common.digests import files_digest

    try:
        return files_digest(files)
    except OSError as exc:
        raise InputError(f"cannot read {root}: {exc.strerror or exc}") from exc
