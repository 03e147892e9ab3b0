"""sam2fewshot: the command line of the engine (segment, models, ...).

Every failure the user can act on ends as one line on stderr and a non-zero exit code; no
partial output file is ever left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .errors import InputError, SAM2FewShotError

EXIT_ERROR = 2


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="sam2.1-tiny", help="registered model name (see 'sam2fewshot models list')")
    g.add_argument("--checkpoint", type=Path, help="local weights file (offline sites); config from --config or --model")
    g.add_argument("--config", help="sam2 config name for --checkpoint, e.g. configs/sam2.1/sam2.1_hiera_t.yaml")
    g.add_argument("--image-size", type=int, help="model input size (default: the model's own)")
    g.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default auto)")
    g.add_argument("--offline", action="store_true", help="never download; use cached weights or --checkpoint")
    g.add_argument("--random-weights", action="store_true",
                   help="the real architecture with random weights: for tests and speed benchmarks only, "
                        "its masks are meaningless")
    g.add_argument("--seed", type=int, default=0, help="seed for everything random (default 0)")


def add_frame_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    g = p.add_argument_group("frames")
    g.add_argument("--axis", default="auto", help="slicing axis: auto (the acquisition axis), axial, coronal, sagittal")
    g.add_argument("--normalization", default="auto",
                   help="auto, a CT preset (abdomen, soft_tissue, liver, lung, bone, brain, ...), "
                        "window:CENTRE,WIDTH or percentile:LOW,HIGH")
    g.add_argument("--per-slice-normalization", action="store_true", help="percentiles per slice, not per volume")
    g.add_argument("--slice-range", type=int, nargs=2, metavar=("FIRST", "LAST"),
                   help="only segment slices FIRST..LAST (inclusive) along the slicing axis")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam2fewshot", description="Few-shot 3D segmentation with SAM2.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a query volume")
    seg.add_argument("--query", required=True, type=Path, help="volume to segment (NIfTI, NRRD, MHA, DICOM folder)")
    seg.add_argument("--out", required=True, type=Path, help="output label map (.nii.gz, .nrrd, .mha or .seg.nrrd)")
    seg.add_argument("--report", type=Path, help="JSON report (default: beside --out, named *_report.json)")
    seg.add_argument("--prompt-labels", type=Path,
                     help="propagate mode: label file on the query's grid with masks on some slices")
    seg.add_argument("--labels", help="comma-separated label values to use from --prompt-labels (default all)")
    seg.add_argument("--prompts", type=Path, help="propagate mode: JSON file with boxes/points in voxel coordinates")
    fs = seg.add_argument_group("matched support (few-shot)")
    fs.add_argument("--support", nargs=2, action="append", type=Path, metavar=("IMAGE", "LABELS"),
                    help="a labelled support case; repeat for several")
    fs.add_argument("--scheme", default="video+memory", choices=["pair", "video", "video+memory"],
                    help="how matched supports condition SAM2 (default video+memory)")
    fs.add_argument("--augmentations", type=int, default=4, help="augmented copies per support slice (default 4)")
    fs.add_argument("--slices-per-structure", type=int, default=8, help="support slices per structure (default 8)")
    fs.add_argument("--features", default="sam2", choices=["sam2", "intensity"], help="similarity features")
    fs.add_argument("--top-k", type=int, default=3, help="support memories per query slice (default 3)")
    fs.add_argument("--extent", default="largest-run", choices=["largest-run", "score"],
                    help="where each structure starts and ends: its longest run of slices SAM2 accepts "
                         "(default), or every slice its object score accepts")
    fs.add_argument("--position-weight", type=float, default=0.0,
                    help="penalty on relative slice position difference in matching (default 0)")
    from .cli_library import add_library_parser, add_retrieval_args

    add_retrieval_args(fs)
    from .cli_guided import add_guided_args

    add_guided_args(seg.add_argument_group("support-guided prompts, registration, LoRA (with --support)"))
    add_model_args(seg)
    add_frame_args(seg)

    from .cli_bench import add_bench_parser
    from .cli_models import add_models_parser
    from .demo import add_demo_parser

    add_models_parser(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    add_library_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "segment":
            return run_segment(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args)
        if args.command == "bench":
            from .cli_bench import run_bench

            return run_bench(args)
        if args.command == "models":
            from .cli_models import run_models

            return run_models(args)
        if args.command == "library":
            from .cli_library import run_library

            return run_library(args)
        raise InputError(f"unknown command {args.command}")
    except SAM2FewShotError as exc:
        print(f"sam2fewshot: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("sam2fewshot: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("sam2fewshot: error: out of memory: try a smaller model, --image-size or --device cpu", file=sys.stderr)
        return EXIT_ERROR


def check_writable(path: Path) -> None:
    """Fail before any work when the output cannot be written."""
    parent = path.resolve().parent
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: folder {parent} is not writable")


def default_report_path(out: Path) -> Path:
    name = out.name
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return out.with_name(name + "_report.json")


def load_model(args):
    """The predictor the arguments ask for, and a dict describing it for the report."""
    import torch

    from . import models
    from .devices import resolve_device
    from .model_build import build_video_predictor

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if args.random_weights:
        spec = models.get_spec(args.model)
        config = args.config or spec.config
        size = args.image_size or spec.image_size
        predictor = build_video_predictor(config, device=device, image_size=size, seed=args.seed)
        return predictor, {"name": args.model, "weights": "random (seeded)", "config": config, "image_size": size,
                           "device": str(device)}
    resolved = models.resolve(args.model, args.checkpoint, args.config, args.image_size, args.offline)
    predictor = models.load_predictor(resolved, device)
    return predictor, {"name": resolved.name, "weights": str(resolved.checkpoint), "config": resolved.config,
                       "image_size": resolved.image_size, "device": str(device)}


def run_segment(args) -> int:
    from .console import ConsoleProgress
    from .normalization import Normalization
    from .json_io import write_json_atomic
    from .session import VolumeSession
    from .volume_io import read_labels, read_volume, write_labels

    report_path = args.report or default_report_path(args.out)
    check_writable(args.out)
    check_writable(report_path)
    if sum(map(bool, (args.support, args.library, args.prompt_labels or args.prompts))) > 1:
        raise InputError("give one of --support (matched support), --library (retrieval) or "
                         "--prompt-labels/--prompts (propagate)")
    if not args.support and not args.library and args.prompt_labels is None and args.prompts is None:
        raise InputError("nothing to segment from: give --support, --library, --prompt-labels or --prompts")
    normalization = Normalization.parse(args.normalization, per_slice=args.per_slice_normalization)
    query = read_volume(args.query)
    prompt_labels = read_labels(args.prompt_labels, reference=query) if args.prompt_labels else None
    values = [int(v) for v in args.labels.split(",")] if args.labels else None

    supports = [(read_volume(i), read_labels(lab, reference=None)) for i, lab in (args.support or [])]

    from .cli_guided import NO_MODEL, run_guided, run_registration, support_method

    method = support_method(args, supports)
    # the registration method is CPU only and weight-free: it never loads a model
    predictor, model_info = load_model(args) if method != "registration" else (None, NO_MODEL)
    session = VolumeSession(predictor, query, args.axis, normalization) if predictor is not None else None
    progress = ConsoleProgress(enabled=not args.quiet)
    try:
        if args.library:
            from .cli_library import run_retrieval

            labels, report = run_retrieval(args, session, progress)
        elif method == "registration":
            labels, report = run_registration(args, query, supports, progress)
        elif method == "guided":
            labels, report = run_guided(args, session, supports, progress)
        elif supports:
            labels, report = run_fewshot(args, session, supports, progress)
        else:
            labels, report = run_propagate(args, session, prompt_labels, values, progress)
    finally:
        progress.close()
    report["model"] = model_info
    report["inputs"] = {"query": str(args.query), "prompt_labels": str(args.prompt_labels or ""),
                        "prompts": str(args.prompts or ""), "library": str(args.library or ""),
                        "supports": [[str(i), str(lab)] for i, lab in (args.support or [])]}
    write_labels(labels, args.out)
    write_json_atomic(report, report_path)
    print(f"wrote {args.out} and {report_path} ({report['timing']['total_s']:.1f} s, "
          f"{report['timing']['per_slice_s']:.3f} s per slice)")
    return 0


def run_fewshot(args, session, supports, progress):
    from .segment_fewshot import FewShotParams, segment_fewshot

    params = FewShotParams(scheme=args.scheme, augmentations=args.augmentations,
                           slices_per_structure=args.slices_per_structure, features=args.features,
                           top_k=args.top_k, extent=args.extent, position_weight=args.position_weight,
                           seed=args.seed)
    return segment_fewshot(session, supports, params, progress=progress, frame_range=_frame_range(args, session))


def run_propagate(args, session, prompt_labels, values, progress):
    from .prompts_file import read_prompts_file
    from .segment_propagate import prompts_from_labels, segment_propagate
    from .volume import default_segments

    prompts, segments = [], []
    if prompt_labels is not None:
        prompts += prompts_from_labels(session, prompt_labels, values)
        segments = list(prompt_labels.segments)
    if args.prompts is not None:
        prompts += read_prompts_file(args.prompts, session.axis, session.volume.array.shape)
    known = {s.value for s in segments}
    segments += list(default_segments(sorted({p.obj_id for p in prompts} - known)))
    return segment_propagate(session, prompts, segments, progress=progress, frame_range=_frame_range(args, session))


def _frame_range(args, session) -> Optional[tuple[int, int]]:
    if not args.slice_range:
        return None
    first, last = args.slice_range
    if not 0 <= first <= last < session.num_slices:
        raise InputError(f"slice range {first}..{last} is outside 0..{session.num_slices - 1}")
    return first, last


if __name__ == "__main__":
    sys.exit(main())
