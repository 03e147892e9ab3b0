"""What the Slicer panel computes that needs neither Qt nor Slicer, so plain pytest can check it.

The panel's methods and their availability, worker jobs from the panel's choices, remembered
settings, slices the user edited since the last result, where a slice lies in the world, the
wording of progress and errors, support libraries scanned off the GUI thread.
Imports numpy and the engine's light modules only: it runs in Slicer before torch is installed.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.choices import AXES, DEVICES, PRECISIONS, SCHEMES  # noqa: F401 - the panel's combo items
from ..common.errors import InputError
from ..common.progress import (
    DOWNLOAD,
    EMBED_LIBRARY,
    ENCODE_QUERY,
    ENCODE_SUPPORTS,
    FIT_LORA,
    FUSE_LABELS,
    LOAD_MODEL,
    PROPAGATE_BACKWARD,
    PROPAGATE_FORWARD,
    stage_unit,
)
from ..io.normalization import CT_PRESETS
from ..methods.matched_support import FewShotParams
from ..methods.options import AUGMENTATIONS, SCHEME, TOP_K, params_from
from ..methods.registry import METHODS, get_method
from ..run.client import JOB_RESULT
from ..run.protocol import METHODS as WORKER_METHODS
from ..run.protocol import Job
from ..run.request import FrameOptions
from ..sam2.build import ModelOptions
from ..sam2.models import DEFAULT_MODEL

NORMALIZATIONS = ("auto", *CT_PRESETS, "mr")

# --- methods --------------------------------------------------------------------------------------

NOT_AVAILABLE = "Not available in this version of the engine."


def method_availability(worker_methods: Sequence[str] = WORKER_METHODS) -> dict[str, str | None]:
    """Method -> None when usable, else why not: the worker must run it and the engine must have it."""
    status: dict[str, str | None] = {}
    for method in METHODS.values():  # in the order the panel lists them
        present = importlib.util.find_spec(method.module_name) is not None
        status[method.key] = None if method.key in worker_methods and present else NOT_AVAILABLE
    return status


# --- jobs -----------------------------------------------------------------------------------------


# The Precision combo: "default" is what the CLI runs without --precision (bfloat16 on CUDA and on
# processors that compute it natively, else float32); "auto" is bfloat16 only where it is native.
PANEL_PRECISIONS = ("default",) + PRECISIONS


# The method options the panel shows, by PanelChoices field; a method takes those it declares
# (methods/options.py), at the parameter it declares them for. Their defaults are matched support's.
PANEL_OPTIONS = {"scheme": SCHEME, "augmentations": AUGMENTATIONS, "top_k": TOP_K}
_FEWSHOT = FewShotParams()


@dataclass(frozen=True)
class PanelChoices:
    """The run options the panel offers (parameter-node values, already typed). Defaults come from the
    engine's own (the model's and frames' options, the methods' Params): the parameter node takes them
    from here."""

    method: str = "propagate"
    model: str = DEFAULT_MODEL
    device: str = ModelOptions.device
    precision: str = "default"
    checkpoint: str | None = None
    image_size: int | None = None
    random_weights: bool = False
    offline: bool = False
    seed: int = ModelOptions.seed
    axis: str = FrameOptions.axis
    normalization: str = FrameOptions.normalization
    slice_range: tuple[int, int] | None = None
    scheme: str = _FEWSHOT.scheme
    augmentations: int = _FEWSHOT.augmentations
    top_k: int = _FEWSHOT.top_k


def build_job(job_id: str, choices: PanelChoices, folder: Path, query: Path,
              prompt_labels: Path | None = None, supports: Sequence[tuple[Path, Path]] = (),
              library: str | None = None, params: dict | None = None, input_notes: Sequence[dict] = (),
              prompts: Path | None = None) -> Job:
    """The worker job for a run whose inputs were written into ``folder`` (``params``: the method's
    parameters the panel does not show, e.g. a refine's prompt slices; ``input_notes``: what reading the
    volumes from the scene did to them, e.g. a DICOM acquisition transform hardened, for the report;
    ``prompts``: the points and boxes file)."""
    method = get_method(choices.method)
    folder = Path(folder)
    shown = {option.dest: getattr(choices, name) for name, option in PANEL_OPTIONS.items()}
    params = {**params_from(method.options(), shown), **(params or {})}
    model = model_options(choices)
    frames = FrameOptions(axis=choices.axis, normalization=choices.normalization, slice_range=choices.slice_range)
    return Job(id=job_id, method=method.key, query=str(query), out=str(folder / JOB_RESULT),
               report=str(folder / "report.json"),
               prompt_labels=str(prompt_labels) if prompt_labels is not None else None,
               prompts=str(prompts) if prompts is not None else None,
               supports=tuple((str(image), str(labels)) for image, labels in supports),
               library=str(library) if library else None, model=model, frames=frames, params=params,
               input_notes=tuple(dict(note) for note in input_notes))


def model_options(choices: PanelChoices) -> ModelOptions:
    """The model the panel chose, as the worker takes it (runs, and the library index of *Add to library*)."""
    return ModelOptions(name=choices.model, checkpoint=choices.checkpoint, image_size=choices.image_size,
                        device=choices.device, precision=None if choices.precision == "default" else choices.precision,
                        offline=choices.offline, random_weights=choices.random_weights, seed=int(choices.seed))


def remembered_value(text, current):
    """A QSettings string (or Qt's own bool/int) as the type of the parameter's ``current`` value;
    ValueError when it is not one (the parameter keeps its default)."""
    if isinstance(current, bool):
        return str(text).lower() == "true"
    if isinstance(current, int):
        return int(text)
    if isinstance(current, enum.Enum):
        return type(current)(str(text))
    return str(text)


# The engine's hints name CLI options; in the panel, its own controls do the same.
_PANEL_WORDS = (
    (re.compile(r"use --checkpoint FILE or sam2fewshot models import \S+ FILE"),
     "use Import checkpoint file (under Method) with a copy of the weights"),
    (re.compile(r"(?:run |use )?sam2fewshot models import \S+ FILE(?: \(or pass --checkpoint FILE\))?"),
     "use Import checkpoint file (under Method)"),
    (re.compile(r"with --axis\b"), "under Advanced (Slicing plane)"),
    (re.compile(r"^invalid job: "), "the run could not start: "),
    (re.compile(r" \(--image-size \d+: [^)]*\)"), ""),  # the panel has no image size control
)


def panel_message(message: str) -> str:
    """An engine message as the panel shows it: the panel's controls instead of CLI options, a
    capital first letter and a full stop."""
    message = message.strip()
    for pattern, words in _PANEL_WORDS:
        message = pattern.sub(words, message)
    if not message:
        return message
    message = message[0].upper() + message[1:]
    return message if message.endswith((".", "!", "?")) else message + "."


def not_found_message(report: dict) -> str:
    """' Not found in this volume: Tumour (best object score -2.10).' for the structures a run found no
    voxel of, so an absent one is said, not left as a silently empty segment; '' when all were found."""
    missing = []
    for entry in report.get("structures", ()):
        if entry.get("status") == "not found":
            score = entry.get("best_object_score")
            missing.append(entry["name"] + ("" if score is None else f" (best object score {score:.2f})"))
    return f" Not found in this volume: {', '.join(missing)}." if missing else ""


# --- refine: the slices the user edited ---------------------------------------------------------


def slice_digests(mask: np.ndarray, axis: int) -> tuple[bytes, ...]:
    """A short digest of each slice of a binary mask along ``axis``: what a result keeps to tell later
    which slices the user edited, a few kilobytes where the label map itself would take gigabytes."""
    slices = np.moveaxis(np.asarray(mask, dtype=bool), axis, 0)
    shape = repr(slices.shape[1:]).encode()
    return tuple(hashlib.blake2b(np.packbits(s).tobytes(), digest_size=16, key=shape[:64]).digest() for s in slices)


def changed_slices(mask: np.ndarray, digests: Sequence[bytes], axis: int) -> list[int]:
    """Indices of the slices (along ``axis``) where ``mask`` differs from the one ``digests`` were made of."""
    now = slice_digests(mask, axis)
    if len(now) != len(digests):
        raise InputError(f"the segmentation has {len(now)} slices where the last result had {len(digests)}")
    return [t for t, (a, b) in enumerate(zip(now, digests, strict=True)) if a != b]


def format_slices(slices: Sequence[int], limit: int = 12) -> str:
    """'3, 4, 10' or '3, 4, 10, ... (40 slices)' for a log line."""
    shown = ", ".join(str(s) for s in slices[:limit])
    return shown if len(slices) <= limit else f"{shown}, ... ({len(slices)} slices)"


# --- geometry -----------------------------------------------------------------------------------


def slice_center_ras(ijk_to_ras: np.ndarray, shape_kji: Sequence[int], axis: int,
                     index: int) -> tuple[float, float, float]:
    """World (RAS) position of the centre of slice ``index`` along numpy ``axis``: where views jump."""
    centre_kji = [(n - 1) / 2.0 for n in shape_kji]
    centre_kji[axis] = float(index)
    k, j, i = centre_kji
    ras = np.asarray(ijk_to_ras, dtype=float) @ np.array([i, j, k, 1.0])
    return float(ras[0]), float(ras[1]), float(ras[2])


# --- progress -----------------------------------------------------------------------------------

STAGE_LABELS = {
    LOAD_MODEL: "Loading the model",
    DOWNLOAD: "Downloading model weights",
    ENCODE_QUERY: "Encoding the query",
    ENCODE_SUPPORTS: "Encoding support slices",
    PROPAGATE_FORWARD: "Propagating forward",
    PROPAGATE_BACKWARD: "Propagating backward",
    EMBED_LIBRARY: "Indexing the library",
    FUSE_LABELS: "Fusing labels",
    FIT_LORA: "Adapting the model (LoRA)",
}


def progress_text(stage: str, done: int, total: int, estimate: str = "") -> str:
    """'Propagating forward: slice 12 of 80', 'Registering support 2 of 4: step 30 of 120', MB for downloads;
    with the run's expected time after it once the engine has given one."""
    text = _stage_progress(stage, done, total)
    return f"{text}. {estimate}" if estimate else text


def _stage_progress(stage: str, done: int, total: int) -> str:
    if stage.startswith("register support "):
        index, _, count = stage.rpartition(" ")[2].partition("/")
        label = f"Registering support {index} of {count}"
    else:
        label = STAGE_LABELS.get(stage, stage.replace("_", " ").capitalize())
    if total <= 0:
        return label
    if stage == DOWNLOAD:
        return f"{label}: {done / 1e6:.0f} of {total / 1e6:.0f} MB"
    if total == 1:
        return label
    return f"{label}: {stage_unit(stage)} {done} of {total}"


def progress_percent(done: int, total: int) -> int:
    return 0 if total <= 0 else int(round(100.0 * min(max(done, 0), total) / total))


def format_elapsed(seconds: float) -> str:
    """'0:07', '12:03' or '1:02:03'."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# --- support libraries --------------------------------------------------------------------------


def library_cases(folder: Path) -> list[tuple[Path, Path]]:
    """The (image, labels) pairs of a support library folder (or list file), as library/cases.py finds them."""
    from ..library.cases import open_library

    return [(case.image, case.labels) for case in open_library(Path(folder)).cases]


class LibraryScan:
    """describe_library on a thread of its own (a folder of thousands of files, or a network share,
    must not freeze Slicer): the panel polls ``done`` and shows ``result``."""

    def __init__(self, folder: str):
        self.folder = folder
        self.result: str | None = None
        self.thread_id: int | None = None
        self._thread = threading.Thread(target=self._scan, name="sam2fewshot-library-scan", daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        self.thread_id = threading.get_ident()
        try:
            self.result = describe_library(self.folder)
        except Exception as exc:  # noqa: BLE001 - shown in the panel's note, never raised in Qt's event loop
            self.result = f"The folder could not be read: {exc}"

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> str | None:
        self._thread.join(timeout)
        return self.result


def describe_library(folder: str) -> str:
    """'12 labelled case(s)', or why there are none: the panel's note under the folder."""
    if not folder:
        return "Choose a folder of labelled cases."
    try:
        return f"{len(library_cases(Path(folder)))} labelled case(s)"
    except ImportError:
        return "The cases are listed once SAM2FewShot's Python packages are installed (press Apply)."
    except InputError as exc:
        return str(exc)
