"""What the Slicer panel computes that needs neither Qt nor Slicer, so plain pytest can check it.

The panel's methods and their availability, worker jobs from the panel's choices, the table of
low-confidence slices from a run's report, slices the user edited since the last result (the
prompts of a refine run), where a slice lies in the world, progress wording, support libraries.
Imports numpy and the engine's light modules only: it runs in Slicer before torch is installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..common.choices import AXES, DEVICES, SCHEMES  # noqa: F401 - the panel's combo items
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
from ..methods.registry import METHODS, get_method
from ..run.protocol import METHODS as WORKER_METHODS
from ..run.protocol import Job
from ..run.request import FrameOptions
from ..sam2.build import ModelOptions
from ..sam2.registry import DEFAULT_MODEL
from .mrml_segments import POLICIES  # noqa: F401 - the panel's choices for existing segments

NORMALIZATIONS = ("auto", *CT_PRESETS, "mr")

# --- methods --------------------------------------------------------------------------------------

NOT_AVAILABLE = "Not available in this version of the engine."


def method_availability(worker_methods: Sequence[str] = WORKER_METHODS) -> dict[str, Optional[str]]:
    """Method -> None when usable, else why not: the worker must run it and the engine must have it."""
    status: dict[str, Optional[str]] = {}
    for method in METHODS.values():  # in the order the panel lists them
        present = importlib.util.find_spec(method.module_name) is not None
        status[method.key] = None if method.key in worker_methods and present else NOT_AVAILABLE
    return status


# --- jobs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelChoices:
    """The run options the panel offers (parameter-node values, already typed)."""

    method: str = "propagate"
    model: str = DEFAULT_MODEL
    device: str = "auto"
    checkpoint: Optional[str] = None
    image_size: Optional[int] = None
    random_weights: bool = False
    offline: bool = False
    seed: int = 0
    axis: str = "auto"
    normalization: str = "auto"
    slice_range: Optional[tuple[int, int]] = None
    scheme: str = "video+memory"
    augmentations: int = 4
    top_k: int = 3


def build_job(job_id: str, choices: PanelChoices, folder: Path, query: Path,
              prompt_labels: Optional[Path] = None, supports: Sequence[tuple[Path, Path]] = (),
              library: Optional[str] = None) -> Job:
    """The worker job for a run whose inputs were written into ``folder``."""
    method = get_method(choices.method)
    folder = Path(folder)
    params: dict = {}
    if method.key == "matched-support":
        params = {"scheme": choices.scheme, "augmentations": int(choices.augmentations), "top_k": int(choices.top_k)}
    elif method.key == "retrieval":
        params = {"top_k": int(choices.top_k)}
    model = ModelOptions(name=choices.model, checkpoint=choices.checkpoint, image_size=choices.image_size,
                         device=choices.device,
                         offline=choices.offline, random_weights=choices.random_weights, seed=int(choices.seed))
    frames = FrameOptions(axis=choices.axis, normalization=choices.normalization, slice_range=choices.slice_range)
    return Job(id=job_id, method=method.key, query=str(query), out=str(folder / "result.seg.nrrd"),
               report=str(folder / "report.json"),
               prompt_labels=str(prompt_labels) if prompt_labels is not None else None,
               supports=tuple((str(image), str(labels)) for image, labels in supports),
               library=str(library) if library else None, model=model, frames=frames, params=params)


# Parameter-node values (strings) behind the panel; the remembered ones are also the QSettings "last choices".
PARAMETER_DEFAULTS = {
    "Method": "propagate", "Model": DEFAULT_MODEL, "Device": "auto", "Axis": "auto", "Normalization": "auto",
    "Scheme": "video+memory", "Augmentations": "4", "TopK": "3", "SliceRange": "", "SupportSource": "scene",
    "LibraryFolder": "", "ExcludedSegments": "", "ExistingPolicy": "keep",
}
REMEMBERED = ("Method", "Model", "Device", "Axis", "Normalization", "Scheme", "Augmentations", "TopK",
              "SupportSource", "LibraryFolder", "ExistingPolicy")


def choices_from_parameters(values: Mapping[str, str]) -> PanelChoices:
    """Typed run options from parameter-node strings; unreadable values fall back to the defaults."""
    def get(name: str) -> str:
        return values.get(name) or PARAMETER_DEFAULTS[name]

    def number(name: str, low: int) -> int:
        try:
            return max(low, int(get(name)))
        except ValueError:
            return int(PARAMETER_DEFAULTS[name])

    return PanelChoices(method=get("Method"), model=get("Model"), device=get("Device"), axis=get("Axis"),
                        normalization=get("Normalization"), slice_range=parse_slice_range(values.get("SliceRange", "")),
                        scheme=get("Scheme"), augmentations=number("Augmentations", 1), top_k=number("TopK", 1))


def parse_slice_range(text: str) -> Optional[tuple[int, int]]:
    """'10,40' -> (10, 40); '' or anything unreadable -> None (the whole volume)."""
    try:
        first, last = (int(v) for v in text.split(","))
    except ValueError:
        return None
    return (first, last) if 0 <= first <= last else None


# --- refine: the slices the user edited ---------------------------------------------------------


def edited_slices(current: np.ndarray, previous: np.ndarray, axis: int) -> list[int]:
    """Indices of the slices (along ``axis``) where the labels differ from the last result."""
    if current.shape != previous.shape:
        raise InputError(f"the segmentation ({current.shape}) is not on the grid of the last result ({previous.shape})")
    differs = np.moveaxis(np.asarray(current) != np.asarray(previous), axis, 0)
    return [int(t) for t in np.flatnonzero(differs.reshape(differs.shape[0], -1).any(axis=1))]


def refine_prompts(current: np.ndarray, previous: np.ndarray, axis: int) -> tuple[np.ndarray, list[int]]:
    """The labels of the edited slices only (zero elsewhere), and those slices: a propagate job's prompts.

    InputError when nothing was edited, or when the edits erased every label of those slices
    (an empty slice cannot be a prompt: propagation needs a mask to start from).
    """
    slices = edited_slices(current, previous, axis)
    if not slices:
        raise InputError("no slice differs from the last result: edit some slices with the Segment Editor first")
    prompts = np.zeros_like(current)
    src, dst = np.moveaxis(current, axis, 0), np.moveaxis(prompts, axis, 0)
    dst[slices] = src[slices]
    if not prompts.any():
        raise InputError(f"the edited slices ({format_slices(slices)}) hold no labelled voxel to propagate from")
    return prompts, slices


def format_slices(slices: Sequence[int], limit: int = 12) -> str:
    """'3, 4, 10' or '3, 4, 10, ... (40 slices)' for a log line."""
    shown = ", ".join(str(s) for s in slices[:limit])
    return shown if len(slices) <= limit else f"{shown}, ... ({len(slices)} slices)"


# --- geometry -----------------------------------------------------------------------------------


def slice_center_ras(ijk_to_ras: np.ndarray, shape_kji: Sequence[int], axis: int, index: int) -> tuple[float, float, float]:
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


def progress_text(stage: str, done: int, total: int) -> str:
    """'Propagating forward: slice 12 of 80', 'Registering support 2 of 4: step 30 of 120', MB for downloads."""
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
