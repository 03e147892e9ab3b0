"""sam2fewshot bench: accuracy, speed and memory of every method in one run, with tables and plots."""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

from ..common.errors import InputError
from ..methods.matched_support import FewShotParams
from ..methods.options import AUGMENTATIONS, SIMILARITY, SLICES_PER_STRUCTURE, TOP_K
from .options import add_command, add_frame_args, add_model_args, frame_options, model_options

# The matched-support parameters every support variant of the bench shares; defaults: the method's own.
BENCH_SUPPORT_OPTIONS = (AUGMENTATIONS, SLICES_PER_STRUCTURE, SIMILARITY, TOP_K)


def add_bench_parser(sub) -> None:
    from ..bench.leave_one_out import VARIANTS
    from ..methods.presets import PRESETS

    p = add_command(sub, "bench", "leave-one-out accuracy, speed and memory of every method",
                    description="Each labelled case in turn is the query, the others its supports. "
                                "Writes results.json, results.md and PNG plots to --out.")
    p.add_argument("--data", type=Path, help="folder of labelled cases (MSD layout, *_img/*_label or *_seg pairs)")
    p.add_argument("--out", type=Path, help="report folder (created if missing); required unless --profile or "
                                             "--precision-check")
    p.add_argument("--methods", "--method", metavar="M,M,...",
                   help=f"comma-separated (default: all): {', '.join(VARIANTS)}")
    p.add_argument("--preset", metavar="NAME,...",
                   help="a published construction with the paper's parameters (" + ", ".join(PRESETS) + "); "
                        "alone, only the presets run; with --methods, after them")
    p.add_argument("--check-equivalence", action="store_true",
                   help="instead of scoring: replay every SAM2 method's propagation on stock sam2 (same weights, "
                        "same conditioning) and print the max logit difference and Dice per method")
    p.add_argument("--support", metavar="CASE", help="one fixed support case instead of leave-one-out")
    p.add_argument("--max-cases", type=int, help="at most this many query cases (the first by name)")
    p.add_argument("--max-supports", type=int, help="at most this many supports per query")
    p.add_argument("--tolerance", type=float, default=1.0, help="surface Dice tolerance in mm")
    p.add_argument("--cold-sessions", action="store_true",
                   help="every method encodes the query itself (default: encoded once, shared)")
    fs = p.add_argument_group("matched support (and the support methods built on it)")
    defaults = FewShotParams()
    for option in BENCH_SUPPORT_OPTIONS:
        default = getattr(defaults, option.dest)
        fs.add_argument(option.flag, type=type(default), choices=list(option.choices) or None,
                        metavar=None if option.choices else "N",
                        help=f"{option.help} (default: {default})")
    sy = p.add_argument_group("speed and memory (synthetic volumes)")
    sy.add_argument("--peer-speed", type=int, default=0, metavar="SLICES",
                    help="compare with a JPEG-folder + stock sam2 pipeline on this many slices (0: off)")
    sy.add_argument("--synthetic-structures", type=int, default=3, help="structures in the synthetic volumes")
    sy.add_argument("--memory-scaling", metavar="N,N,...", help="peak memory for these slice counts, e.g. 50,200,800")
    sy.add_argument("--memory-feature-budget-mb", type=float,
                    help="encoder features kept in memory in the memory runs (default: the session's, 64 MB)")
    sy.add_argument("--memory-mmap-threshold", type=int, metavar="BYTES",
                    help="fix glibc's M_MMAP_THRESHOLD in the memory runs (e.g. 65536) to tell data from "
                         "allocator slack")
    sy.add_argument("--synthetic-size", type=int, default=256, help="slice size of synthetic volumes")
    pr = p.add_argument_group("profile and precision (instead of the runs above)")
    pr.add_argument("--profile", action="store_true",
                    help="time and count the FLOPs of a propagation and a matched-support run per model part and "
                         "op kind, beside this machine's matmul peak (on --data's first case, else synthetic)")
    pr.add_argument("--precision-check", action="store_true",
                    help="bf16 against fp32 on --data's cases (else synthetic): logit difference, Dice per "
                         "structure, s/slice both ways")
    pr.add_argument("--profile-slices", type=int, default=8, metavar="N",
                    help="query slices of the profile and the precision check, around the most labelled one "
                         "(0: all)")
    pr.add_argument("--json", type=Path, metavar="FILE", help="also write the profile or precision check as JSON")
    lc = p.add_argument_group("learning curve (instead of the runs above)")
    lc.add_argument("--learning-curve", action="store_true",
                    help="Dice of --method as the labelled set grows from 1 to N-1 of the other cases (supports, or "
                         "the library of retrieval), over random orders; writes learning_curve.csv, "
                         "learning_curve_runs.csv, learning_curve.json and learning_curve.png to --out")
    lc.add_argument("--orders", type=int, default=3, metavar="K",
                    help="random orders of the other cases per query, averaged (seeded by --seed)")
    add_model_args(p)
    add_frame_args(p, slice_range=False)


def run_bench(args: argparse.Namespace) -> int:
    """Runs the benchmark with the asked torch thread count, and puts the count back afterwards."""
    import torch

    previous = torch.get_num_threads()
    if args.threads:
        if args.threads < 1:
            raise InputError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace) -> int:
    from ..bench.leave_one_out import (
        BenchProgress,
        BenchSettings,
        bench_cases,
        choose_methods,
        plan_queries,
        run_leave_one_out,
    )
    from ..bench.results import markdown, summarize_runs, write_results
    from ..io.normalization import Normalization
    from ..methods.registry import get_method
    from ..run.runner import Runner

    if getattr(args, "profile", False) or getattr(args, "precision_check", False):
        return _profile(args)
    if getattr(args, "learning_curve", False):
        return _learning_curve(args)
    if args.out is None:
        raise InputError("give --out, the report folder")
    counts = _counts(args.memory_scaling)
    if args.data is None and not args.peer_speed and not counts:
        raise InputError("nothing to benchmark: give --data, --peer-speed or --memory-scaling")
    if args.check_equivalence and args.data is None:
        raise InputError("--check-equivalence runs the methods on --data: give a folder of labelled cases")
    fewshot = _fewshot(args)
    checked = get_method("matched-support").params(fewshot, seed=args.seed)  # bad values fail before any work
    Normalization.parse(args.normalization)
    settings = BenchSettings(frame_options(args), model_options(args), fewshot, args.tolerance, args.support,
                             args.max_cases, args.max_supports, args.cold_sessions)
    methods, cases, plan = [], {}, []
    if args.data is not None:
        presets = [p.strip() for p in args.preset.split(",") if p.strip()] if args.preset else []
        methods = choose_methods(args.methods.split(",") if args.methods else None, presets)
        cases = bench_cases(args.data)
        plan = plan_queries(cases, settings)
    _prepare_out(args.out)  # only once the input is known to be good

    runner, predictor, model_info = Runner(save_support_features=False), None, None  # supports timed every run
    if any(m.needs_model for m in methods) or args.peer_speed or counts:
        predictor, model_info = runner.model(settings.model)
    results = {"tool": "sam2fewshot bench", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "settings": {"tolerance_mm": settings.tolerance_mm, "axis": settings.frames.axis,
                            "normalization": args.normalization, "fewshot": asdict(checked),
                            "support": settings.support, "cold_sessions": settings.cold_sessions},
               "model": model_info, "machine": machine_info(predictor),
               "cases": [q for q, _ in plan],
               "methods": {m.name: {"description": m.description, "uses_query_truth": m.uses_query_truth,
                                    "needs_model": m.needs_model} for m in methods},
               "runs": []}
    if plan and args.check_equivalence:
        from ..bench.equivalence import check_variants

        progress = BenchProgress(len(plan) * sum(m.needs_model for m in methods), enabled=not args.quiet)
        try:
            results["equivalence"] = check_variants(cases, methods, runner, settings, progress)
        finally:
            progress.close()
            runner.forget_sessions()
    elif plan:
        progress = BenchProgress(len(plan) * len(methods), enabled=not args.quiet)
        try:
            results["runs"] = run_leave_one_out(cases, methods, runner, settings, progress)
        finally:
            progress.close()
            runner.forget_sessions()
        results["summary"] = summarize_runs(results["runs"])
    if args.peer_speed:
        from ..bench.peer import peer_speed

        _say(args, f"peer-style speed comparison on {args.peer_speed} synthetic slices ...")
        results["peer_speed"] = peer_speed(predictor, model_info["config"], args.peer_speed, args.synthetic_size,
                                           args.synthetic_structures, seed=args.seed)
    if counts:
        results["memory_scaling"] = _memory_scaling(args, model_info, counts)
    paths = write_results(results, args.out)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    unequal = [r for r in results.get("equivalence", []) if not r["equal"]]
    if unequal:
        print(f"sam2fewshot: {len(unequal)} method(s) differ from stock sam2: "
              + ", ".join(f"{r['case']} {r['method']}" for r in unequal))
        return 1
    failed = [r for r in results["runs"] if r["status"] != "ok"]
    if failed:
        print(f"sam2fewshot: {len(failed)} of {len(results['runs'])} runs failed (see {args.out / 'results.md'})")
        return 1
    return 0


def _profile(args: argparse.Namespace) -> int:
    """bench --profile and/or --precision-check: tables on stdout, and --json FILE."""
    import json

    from ..bench import precision, profile
    from ..run.runner import Runner

    if args.profile_slices < 0:
        raise InputError("--profile-slices must be 0 (all) or more")
    fewshot = _fewshot(args)
    results, say = {}, (lambda text: _say(args, text))
    with profile.scratch_folder() as tmp:
        cases = profile.data_inputs(Path(tmp), args.data, args.profile_slices, args.synthetic_size,
                                    args.synthetic_structures, args.seed, args.support,
                                    1 if not args.precision_check else args.max_cases)
        if args.profile:
            runner = Runner(save_support_features=False)
            try:
                results["profile"] = profile.run_profile(runner, cases[0], model_options(args), frame_options(args),
                                                         fewshot, say)
            finally:
                runner.forget()
            print(profile.markdown(results["profile"]))
        if args.precision_check:
            results["precision"] = precision.precision_check(cases, model_options(args), frame_options(args), say)
            print(precision.markdown(results["precision"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


def _learning_curve(args: argparse.Namespace) -> int:
    """bench --learning-curve: the table on stdout, CSV, JSON and a plot in --out."""
    from ..bench.learning_curve import check_curve, learning_curve, markdown_table
    from ..bench.leave_one_out import BenchSettings, bench_cases, choose_methods

    if args.data is None or args.out is None:
        raise InputError("--learning-curve needs --data (labelled cases) and --out (the report folder)")
    methods = choose_methods(args.methods.split(","), []) if args.methods else []
    settings = BenchSettings(frame_options(args), model_options(args), _fewshot(args), args.tolerance, args.support,
                             args.max_cases, args.max_supports, args.cold_sessions)
    check_curve(methods, args.orders, settings)
    cases = bench_cases(args.data)
    _prepare_out(args.out)
    start = time.perf_counter()
    records, summary, paths = learning_curve(cases, methods, settings, args.out, args.orders, args.seed, args.quiet)
    print(markdown_table(summary))
    print(f"{len(records)} points over {args.orders} orders in {time.perf_counter() - start:.0f} s; wrote "
          + ", ".join(str(p) for p in paths))
    failed = sum(r["status"] != "ok" for r in records)
    if failed:
        print(f"sam2fewshot: {failed} of {len(records)} points failed (see {args.out / 'learning_curve_runs.csv'})")
    return 1 if failed else 0


def _memory_scaling(args, model_info: dict, counts: list[int]) -> dict:
    from ..bench.ram import ModelRecipe, fit_per_slice, memory_scaling

    recipe = ModelRecipe(model_info["config"], None if args.random_weights else model_info["weights"],
                         int(model_info["image_size"]), args.seed, model_info["device"], args.threads)
    _say(args, f"memory against slice count {counts}, one fresh process each ...")
    points = memory_scaling(recipe, counts, args.synthetic_size, args.synthetic_structures,
                            args.memory_feature_budget_mb, mmap_threshold=args.memory_mmap_threshold,
                            on_point=lambda p: _say(args, f"  {p['slices']} slices: peak "
                                                          f"{p['peak_rss_above_start_mb']} MB above start"))
    keys = ("peak_rss_above_start_mb", "frames_mb", "above_frames_mb", "features_held_mb", "features_on_disk_mb",
            "outputs_mb", "rest_mb", "live_at_end_mb")
    return {"points": points, "feature_budget_mb": args.memory_feature_budget_mb,
            "mmap_threshold": args.memory_mmap_threshold,
            "per_slice_mb": {k: fit_per_slice(points, k) for k in keys}}


def _counts(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 2:
        raise InputError(f"--memory-scaling wants slice counts of at least 2, e.g. 50,200,800 (got '{text}')")
    return counts


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create report folder {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise InputError(f"report folder {out} is not writable")


def machine_info(predictor) -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(terse=True), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": None if predictor is None else str(predictor.device),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": None if load is None else [round(x, 2) for x in load]}


def _fewshot(args: argparse.Namespace) -> dict:
    """The support options given (the others keep matched support's defaults)."""
    return {o.dest: getattr(args, o.dest) for o in BENCH_SUPPORT_OPTIONS if getattr(args, o.dest) is not None}


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)
