"""Leave-one-out benchmark of every segmentation method over a folder of labelled cases.

Each case in turn is the query; the others (or one fixed case) are its supports. Every method
runs on the same query, and its result is scored against the query's ground truth, which no
method reads, except "propagate": it is prompted with the ground-truth mask of each structure on
that structure's largest slice, the interactive upper bound.

By default a query's frames are encoded once (timed as the case's ``encode_s``) and every model
method reuses that warm session, as the Slicer worker does; ``cold_sessions`` gives each method
its own session instead. Support features are never carried from one method to the next: each
method encodes its own supports, so no scheme's time depends on the order the methods run in. A method joins the benchmark by one ``register_method`` call.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .bench_memory import PeakMemory
from .bench_metrics import DEFAULT_TOLERANCE_MM, score_labels
from .errors import Cancelled, InputError
from .feature_cache import ProgressFn
from .normalization import Normalization
from .segment_fewshot import FewShotParams
from .volume import LabelMap, Volume

log = logging.getLogger(__name__)
SupportCase = tuple[Volume, LabelMap]
CasePaths = tuple[Path, Path]


@dataclass(frozen=True)
class BenchSettings:
    axis: str = "auto"
    normalization: Normalization = Normalization()
    fewshot: FewShotParams = FewShotParams()
    tolerance_mm: float = DEFAULT_TOLERANCE_MM
    support: Optional[str] = None  # a fixed support case; default: every other case
    max_cases: Optional[int] = None
    max_supports: Optional[int] = None
    cold_sessions: bool = False


@dataclass
class MethodContext:
    """What a method gets for one query. ``truth`` is None unless the method declares it uses it."""

    query: Volume
    supports: list[SupportCase]
    settings: BenchSettings
    session: object = None  # VolumeSession for model methods
    truth: Optional[LabelMap] = None
    progress: Optional[ProgressFn] = None
    support_paths: list[CasePaths] = field(default_factory=list)  # the supports' files, same order


@dataclass(frozen=True)
class BenchMethod:
    name: str
    description: str
    run: Callable[[MethodContext], tuple[LabelMap, dict]]
    needs_model: bool = True
    uses_query_truth: bool = False
    requires_module: Optional[str] = None  # importable module the method needs (methods being written)

    def unavailable(self) -> Optional[str]:
        if self.requires_module and importlib.util.find_spec(self.requires_module) is None:
            return f"{self.requires_module} is not installed"
        return None


METHODS: dict[str, BenchMethod] = {}


def register_method(method: BenchMethod) -> BenchMethod:
    METHODS[method.name] = method
    return method


def _propagate(ctx: MethodContext) -> tuple[LabelMap, dict]:
    from .segment_propagate import segment_propagate

    return segment_propagate(ctx.session, truth_prompts(ctx.session, ctx.truth), ctx.truth.segments,
                             progress=ctx.progress)


def truth_prompts(session, truth: LabelMap) -> list:
    """A mask prompt per structure on the slice where its ground-truth area is largest."""
    from .propagation import Prompt

    slices = session.slices_of(truth.volume.array)
    prompts = []
    for seg in truth.segments:
        hit = slices == seg.value
        areas = hit.sum(axis=(1, 2))
        if areas.max(initial=0) > 0:
            t = int(np.argmax(areas))
            prompts.append(Prompt(frame=t, obj_id=seg.value, mask=hit[t]))
    if not prompts:
        raise InputError("the query's ground truth has no labelled voxel")
    return prompts


def _matched_support(ctx: MethodContext, scheme: str) -> tuple[LabelMap, dict]:
    from dataclasses import replace

    from .segment_fewshot import segment_fewshot

    params = replace(ctx.settings.fewshot, scheme=scheme)
    return segment_fewshot(ctx.session, ctx.supports, params, progress=ctx.progress)


def _retrieval(ctx: MethodContext) -> tuple[LabelMap, dict]:
    """A library of this query's supports, indexed afresh in a temporary folder (its time counts)."""
    import tempfile

    from .library import library_from_pairs
    from .segment_retrieval import RetrievalParams, segment_retrieval

    params = RetrievalParams(top_k=ctx.settings.fewshot.top_k, normalization=ctx.settings.normalization)
    with tempfile.TemporaryDirectory(prefix="sam2fewshot_bench_library_") as root:
        library = library_from_pairs(ctx.support_paths, root)
        return segment_retrieval(ctx.session, library, params, progress=ctx.progress)


def _guided(ctx: MethodContext, prior: str) -> tuple[LabelMap, dict]:
    from dataclasses import replace

    from .guided import GuidedParams, segment_guided

    params = GuidedParams(prior=prior, fewshot=replace(ctx.settings.fewshot, scheme="video"))
    return segment_guided(ctx.session, ctx.supports, params, progress=ctx.progress)


def _registration(ctx: MethodContext) -> tuple[LabelMap, dict]:
    from .label_fusion import registration_segment

    return registration_segment(ctx.query, ctx.supports, progress=ctx.progress)


register_method(BenchMethod(
    "propagate", "propagation from the ground-truth mask on each structure's largest slice "
    "(reads the query's ground truth: the interactive upper bound)", _propagate, uses_query_truth=True))
for _scheme in ("pair", "video", "video+memory"):
    register_method(BenchMethod(f"matched-support:{_scheme}", f"matched support slices, scheme {_scheme}",
                                partial(_matched_support, scheme=_scheme)))
register_method(BenchMethod("retrieval", "the supports as a library: top-k most similar labelled slices per query "
                            "slice as memories (index built per query)", _retrieval,
                            requires_module="SAM2FewShotLib.segment_retrieval"))
register_method(BenchMethod("registration", "support cases registered to the query, labels fused (no model)",
                            _registration, needs_model=False, requires_module="SAM2FewShotLib.label_fusion"))
for _prior in ("registration", "sam2"):
    register_method(BenchMethod(f"guided:{_prior}", f"pseudo-masks from the {_prior} prior as box+mask prompts "
                                "that SAM2 refines", partial(_guided, prior=_prior),
                                requires_module="SAM2FewShotLib.guided"))


def choose_methods(names: Optional[Sequence[str]] = None) -> list[BenchMethod]:
    """The named methods (all available ones by default), in registry order."""
    if not names:
        return [m for m in METHODS.values() if m.unavailable() is None]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    for n in names:
        reason = METHODS[n].unavailable()
        if reason:
            raise InputError(f"method {n} is not available here: {reason}")
    return [m for m in METHODS.values() if m.name in names]


def bench_cases(folder: Path) -> dict[str, CasePaths]:
    """Labelled cases: MSD layout, *_img/*_label pairs, or *.nii.gz with a *_seg.nii.gz beside it."""
    from .example_data import find_cases

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
class _Loaded:
    cache: dict[str, tuple[Volume, LabelMap]] = field(default_factory=dict)

    def get(self, name: str, paths: CasePaths) -> tuple[Volume, LabelMap]:
        from .volume_io import read_labels, read_volume

        if name not in self.cache:
            image = read_volume(paths[0])
            self.cache[name] = (image, read_labels(paths[1], reference=image))
        return self.cache[name]


def run_leave_one_out(cases: dict[str, CasePaths], methods: Sequence[BenchMethod], predictor,
                      settings: BenchSettings, progress: Optional[BenchProgress] = None) -> list[dict]:
    """One record per (query, method): scores per structure, time, peak memory, or the error."""
    plan = plan_queries(cases, settings)
    loaded = _Loaded()
    runs = []
    for query_name, support_names in plan:
        query, truth = loaded.get(query_name, cases[query_name])
        supports = [loaded.get(n, cases[n]) for n in support_names]
        session, encode = None, {"encode_s": 0.0}
        if any(m.needs_model for m in methods) and not settings.cold_sessions:
            session, encode = _warm_session(predictor, query, settings, progress)
        inputs = MethodContext(query, supports, settings, progress=progress,
                               support_paths=[cases[n] for n in support_names])
        for method in methods:
            if progress:
                progress.start(query_name, method.name)
            record = {"case": query_name, "method": method.name, "supports": support_names,
                      "uses_query_truth": method.uses_query_truth}
            record.update(_run_one(method, predictor, inputs, truth, session,
                                   encode if method.needs_model else {"encode_s": 0.0}))
            if record["status"] != "ok" and progress:
                progress.write(f"{query_name} {method.name}: {record['error']}")
            runs.append(record)
            if progress:
                progress.advance()
    return runs


def _new_session(predictor, query: Volume, settings: BenchSettings):
    from .session import VolumeSession

    return VolumeSession(predictor, query, settings.axis, settings.normalization)


def _warm_session(predictor, query: Volume, settings: BenchSettings, progress):
    with PeakMemory(predictor.device) as mem:
        start = time.perf_counter()
        session = _new_session(predictor, query, settings)
        session.cache.embed_all(progress=progress)
        seconds = time.perf_counter() - start
    return session, {"encode_s": round(seconds, 3), "encode_memory": mem.as_json()}


def _run_one(method: BenchMethod, predictor, inputs: MethodContext, truth: LabelMap, session, encode: dict) -> dict:
    """One method on one query, timed and watched; ``inputs`` gets the session and, if declared, the truth."""
    from dataclasses import replace

    query, settings = inputs.query, inputs.settings
    device = getattr(predictor, "device", None) if method.needs_model else None
    try:
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            if method.needs_model and session is None:
                session = _new_session(predictor, query, settings)
            elif session is not None:
                session.drop_supports()
            ctx = replace(inputs, session=session if method.needs_model else None,
                          truth=truth if method.uses_query_truth else None)
            labels, report = method.run(ctx)
            seconds = time.perf_counter() - start
    except (KeyboardInterrupt, Cancelled):
        raise
    except Exception as exc:  # one failed method must not hide the others' results
        log.debug("bench run failed", exc_info=True)
        return {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    n = _slice_count(query, settings, session)
    total = encode["encode_s"] + seconds
    scores = score_labels(labels, truth, settings.tolerance_mm)
    return {
        "status": "ok", "num_slices": n, "method_s": round(seconds, 3), **encode,
        "total_s": round(total, 3), "per_slice_s": round(total / n, 4), "memory": mem.as_json(),
        "structures": {name: s.as_json() for name, s in scores.items()},
        "frames_encoded": report.get("timing", {}).get("frames_encoded"),
    }


def _slice_count(query: Volume, settings: BenchSettings, session) -> int:
    if session is not None:
        return session.num_slices
    from .frames import slicing_axis

    return int(query.array.shape[slicing_axis(query, settings.axis)])
