"""Leave-one-out benchmark of every segmentation method over a folder of labelled cases.

Each case in turn is the query; the others (or one fixed case) are its supports. Every method
runs on the same query through the same Runner the CLI and the worker use (one Request per run),
and its result is scored against the query's ground truth, which no method reads, except
"propagate": it is prompted with the ground-truth mask of each structure on that structure's
largest slice, the interactive upper bound.

By default a query's frames are encoded once (timed as the case's ``encode_s``) and every model
method reuses that warm session, as the Slicer worker does; ``cold_sessions`` gives each method
its own session instead. Support features are never carried from one method to the next: each
method encodes its own supports, so no scheme's time depends on the order the methods run in. A
variant joins the benchmark by one ``register_variant`` call.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..common.errors import Cancelled, InputError
from ..io.slicing import slicing_axis
from ..io.volume import LabelMap, Volume
from ..methods.registry import LIBRARY, PROMPTS, get_method
from ..run.request import FrameOptions, Request
from ..sam2.build import ModelOptions
from .metrics import DEFAULT_TOLERANCE_MM, score_labels
from .ram import PeakMemory

log = logging.getLogger(__name__)
CasePaths = tuple[Path, Path]


@dataclass(frozen=True)
class BenchSettings:
    frames: FrameOptions = field(default_factory=FrameOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    fewshot: dict = field(default_factory=dict)  # matched-support parameters every support variant shares
    tolerance_mm: float = DEFAULT_TOLERANCE_MM
    support: str | None = None  # a fixed support case; default: every other case
    max_cases: int | None = None
    max_supports: int | None = None
    cold_sessions: bool = False


@dataclass(frozen=True)
class BenchVariant:
    """A method with the parameters it is benchmarked with."""

    name: str
    description: str
    method: str  # the registered method its requests name
    params: Callable[[dict], dict]  # the settings' shared few-shot parameters -> the method's parameters
    uses_query_truth: bool = False
    extent_from_truth: bool = False  # segment only the query's labelled slice range (a paper's protocol)

    @property
    def needs_model(self) -> bool:
        return get_method(self.method).needs_model


VARIANTS: dict[str, BenchVariant] = {}


def register_variant(variant: BenchVariant) -> BenchVariant:
    VARIANTS[variant.name] = variant
    return variant


register_variant(BenchVariant(
    "propagate", "propagation from the ground-truth mask on each structure's largest slice "
    "(reads the query's ground truth: the interactive upper bound)", "propagate", lambda fs: {},
    uses_query_truth=True))
for _scheme in ("pair", "video", "video+memory"):
    register_variant(BenchVariant(f"matched-support:{_scheme}", f"matched support slices, scheme {_scheme}",
                                  "matched-support", lambda fs, s=_scheme: {**fs, "scheme": s}))
register_variant(BenchVariant("retrieval", "the supports as a library: top-k most similar labelled slices per query "
                              "slice as memories (index built per query)", "retrieval",
                              lambda fs: {"top_k": fs["top_k"]} if "top_k" in fs else {}))
register_variant(BenchVariant("registration", "support cases registered to the query, labels fused (no model)",
                              "registration", lambda fs: {}))
for _prior in ("registration", "sam2"):
    register_variant(BenchVariant(f"guided:{_prior}", f"pseudo-masks from the {_prior} prior as box+mask prompts "
                                  "that SAM2 refines", "guided",
                                  lambda fs, p=_prior: {"prior": p, "fewshot": dict(fs)}))  # its own scheme


def preset_variant(name: str) -> BenchVariant:
    """A published construction (methods/presets.py) as a bench variant, with the paper's own parameters."""
    from ..methods.presets import get_preset

    preset = get_preset(name)
    extent = " on the query's labelled slice range (reads its ground truth)" if preset.extent_from_truth else ""
    return BenchVariant(f"preset:{preset.name}", f"{preset.construction}{extent}; after {preset.source}",
                        preset.method, lambda fs, p=preset: dict(p.params), uses_query_truth=preset.extent_from_truth,
                        extent_from_truth=preset.extent_from_truth)


def choose_methods(names: Sequence[str] | None = None, presets: Sequence[str] = ()) -> list[BenchVariant]:
    """The named variants (all by default, unless presets alone are asked for), in registry order,
    then the presets'."""
    chosen = [preset_variant(p) for p in presets]
    if not names:
        return chosen if chosen else list(VARIANTS.values())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    return [v for v in VARIANTS.values() if v.name in names] + chosen


def bench_cases(folder: Path) -> dict[str, CasePaths]:
    """Labelled cases: MSD layout, *_img/*_label pairs, or *.nii.gz with a *_seg.nii.gz beside it."""
    from ..io.example_data import find_cases

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"data folder {folder} does not exist")
    cases = find_cases(folder)
    for img in sorted(folder.glob("*.nii.gz")):
        lab = img.with_name(img.name[: -len(".nii.gz")] + "_seg.nii.gz")
        if lab.exists():
            cases[img.name[: -len(".nii.gz")]] = (img, lab)
    if not cases:
        raise InputError(f"no labelled cases in {folder} (expected imagesTr/labelsTr, *_img/*_label "
                         "or *.nii.gz with *_seg.nii.gz pairs)")
    return dict(sorted(cases.items()))


def plan_queries(cases: dict[str, CasePaths], settings: BenchSettings) -> list[tuple[str, list[str]]]:
    """(query, supports) pairs of the leave-one-out."""
    names = list(cases)
    if settings.support is not None:
        if settings.support not in cases:
            raise InputError(f"no case named {settings.support} (cases: {', '.join(names)})")
        queries = [n for n in names if n != settings.support]
    else:
        queries = names
    if settings.max_cases is not None:
        queries = queries[: settings.max_cases]
    plan = []
    for q in queries:
        supports = [settings.support] if settings.support else [n for n in queries if n != q]
        plan.append((q, supports[: settings.max_supports] if settings.max_supports else supports))
    if not plan or any(not s for _, s in plan):
        raise InputError("leave-one-out needs at least two labelled cases (or --support CASE and one more)")
    return plan


def truth_prompt_labels(truth: LabelMap, axis: int) -> LabelMap:
    """Each structure's ground truth on the slice (along ``axis``) where its area is largest, nothing else."""
    slices = np.moveaxis(truth.volume.array, axis, 0)
    prompt = np.zeros_like(truth.volume.array)
    out = np.moveaxis(prompt, axis, 0)
    for seg in truth.segments:
        areas = (slices == seg.value).sum(axis=(1, 2))
        if areas.max(initial=0) > 0:
            t = int(np.argmax(areas))
            out[t][slices[t] == seg.value] = seg.value
    if not prompt.any():
        raise InputError("the query's ground truth has no labelled voxel")
    return truth.with_array(prompt)


def labelled_range(truth: LabelMap, axis: int) -> tuple[int, int]:
    """First and last slice along ``axis`` with any labelled voxel."""
    present = np.flatnonzero(np.moveaxis(truth.volume.array, axis, 0).reshape(truth.volume.array.shape[axis], -1)
                             .any(axis=1))
    if present.size == 0:
        raise InputError("the query's ground truth has no labelled voxel")
    return int(present[0]), int(present[-1])


class BenchProgress:
    """One console bar over cases x methods; the engine's own stages show as its postfix."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="run", desc="bench", disable=not enabled, dynamic_ncols=True)

    def start(self, case: str, method: str) -> None:
        self.bar.set_description(f"{case} {method}")

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.bar.set_postfix_str(f"{stage} {done}/{total}", refresh=False)

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


@dataclass
class QueryCase:
    """One query of the plan: its files, its ground truth, its supports' files, and a scratch folder."""

    name: str
    paths: CasePaths
    truth: LabelMap
    supports: list[CasePaths]
    scratch: Path
    support_names: list[str] = field(default_factory=list)

    def request(self, variant: BenchVariant, settings: BenchSettings) -> Request:
        """The request of one variant on this query; prompts and a library are made in the scratch folder."""
        spec = get_method(variant.method)
        inputs: dict = {"supports": tuple(self.supports)}
        if spec.inputs == PROMPTS:
            inputs = {"prompt_labels": self._truth_prompts(settings)}
        elif spec.inputs == LIBRARY:
            inputs = {"library": self._library()}
        frames = settings.frames
        if variant.extent_from_truth:
            axis = slicing_axis(self.truth.volume, frames.axis)
            frames = replace(frames, slice_range=labelled_range(self.truth, axis))
        return Request(method=variant.method, query=self.paths[0], model=settings.model, frames=frames,
                       params=variant.params(dict(settings.fewshot)), **inputs)

    def _truth_prompts(self, settings: BenchSettings) -> Path:
        from ..io.volume_io import write_labels

        path = self.scratch / "truth_prompts.seg.nrrd"
        if not path.exists():
            write_labels(truth_prompt_labels(self.truth, slicing_axis(self.truth.volume, settings.frames.axis)), path)
        return path

    def _library(self) -> Path:
        """A library of this query's supports, indexed afresh for each run (its time counts)."""
        from ..library.cases import write_list_file

        return write_list_file(self.supports, tempfile.mkdtemp(prefix="library_", dir=self.scratch))


def query_cases(cases: dict[str, CasePaths], settings: BenchSettings) -> Iterator[QueryCase]:
    """The plan's queries in turn, each with its truth read and a scratch folder that lasts its turn."""
    from ..io.volume_io import read_labels, read_volume

    for query_name, support_names in plan_queries(cases, settings):
        with tempfile.TemporaryDirectory(prefix="sam2fewshot_bench_") as scratch:
            paths = cases[query_name]
            truth = read_labels(paths[1], reference=read_volume(paths[0]))
            supports = [cases[n] for n in support_names]
            yield QueryCase(query_name, paths, truth, supports, Path(scratch), support_names)


def run_leave_one_out(cases: dict[str, CasePaths], methods: Sequence[BenchVariant], runner,
                      settings: BenchSettings, progress: BenchProgress | None = None) -> list[dict]:
    """One record per (query, method): scores per structure, time, peak memory, or the error."""
    runs = []
    for case in query_cases(cases, settings):
        query_name, paths, support_names = case.name, case.paths, case.support_names
        encode = {"encode_s": 0.0}
        if any(m.needs_model for m in methods) and not settings.cold_sessions:
            encode = _encode_query(runner, paths[0], settings, progress)
        for method in methods:
            if progress:
                progress.start(query_name, method.name)
            record = {"case": query_name, "method": method.name, "supports": support_names,
                      "uses_query_truth": method.uses_query_truth}
            record.update(_run_one(method, runner, case, settings, encode if method.needs_model else
                                   {"encode_s": 0.0}, progress))
            if record["status"] != "ok" and progress:
                progress.write(f"{query_name} {method.name}: {record['error']}")
            runs.append(record)
            if progress:
                progress.advance()
        runner.forget_sessions()  # a finished query's features are not needed again
    return runs


def _encode_query(runner, query: Path, settings: BenchSettings, progress) -> dict:
    """The query encoded once, on the runner's warm session, timed apart from the methods."""
    predictor, _ = runner.model(settings.model, progress)  # loading the model is not encoding
    with PeakMemory(predictor.device) as mem:
        start = time.perf_counter()
        runner.session(str(query), settings.frames, settings.model, progress).cache.embed_all(progress=progress)
        seconds = time.perf_counter() - start
    return {"encode_s": round(seconds, 3), "encode_memory": mem.as_json()}


def _run_one(method: BenchVariant, runner, case: QueryCase, settings: BenchSettings, encode: dict,
             progress) -> dict:
    """One variant on one query through the runner, timed and watched."""
    device = runner.model(settings.model)[0].device if method.needs_model else None
    try:
        request = case.request(method, settings)
        if settings.cold_sessions:
            runner.forget_sessions()
        runner.forget_supports()  # every variant encodes its own supports
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            labels, report = runner.run(request, progress)
            seconds = time.perf_counter() - start
    except (KeyboardInterrupt, Cancelled):
        raise
    except Exception as exc:  # one failed method must not hide the others' results
        log.debug("bench run failed", exc_info=True)
        return {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    n = _slice_count(report, labels.volume, settings)
    total = encode["encode_s"] + seconds
    scores = score_labels(labels, case.truth, settings.tolerance_mm)
    return {
        "status": "ok", "num_slices": n, "method_s": round(seconds, 3), **encode,
        "total_s": round(total, 3), "per_slice_s": round(total / n, 4), "memory": mem.as_json(),
        "structures": {name: s.as_json() for name, s in scores.items()},
        "frames_encoded": report.get("timing", {}).get("frames_encoded"),
    }


def _slice_count(report: dict, query: Volume, settings: BenchSettings) -> int:
    if "session" in report:
        return int(report["session"]["num_slices"])
    return int(query.array.shape[slicing_axis(query, settings.frames.axis)])
