"""`sam2fewshot segment`: its options, the Request they become, and the run.

What conditions the run picks the default method: --prompt-labels/--prompts (propagate), --library
(retrieval) or --support (matched-support); --method names another registered method conditioned
the same way: with --support, guided (a prior's pseudo-masks as per-slice SAM2 prompts) or
registration (the fused registered support labels: CPU only, no model is ever loaded). A method's
parameters without an option of their own are set with --param NAME=VALUE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from ..common.errors import InputError
from ..methods.common import EXTENTS
from ..methods.guided import PRIORS, PROMPT_TYPES
from ..methods.matched_support import FEATURES
from ..methods.registry import LIBRARY, METHODS, PROMPTS, SUPPORTS, get_method
from ..registration.fusion import FUSION_METHODS
from ..registration.register import TRANSFORMS
from ..run.outputs import default_report_path
from ..run.request import Request
from ..support.memory import SCHEMES
from .options import add_frame_args, add_model_args, frame_options, model_options

# The option that gives each kind of conditioning, and the method it runs by default.
INPUT_OPTIONS = {SUPPORTS: "--support", LIBRARY: "--library", PROMPTS: "--prompt-labels or --prompts"}
DEFAULT_METHODS = {SUPPORTS: "matched-support", LIBRARY: "retrieval", PROMPTS: "propagate"}


def add_segment_parser(sub) -> argparse.ArgumentParser:
    seg = sub.add_parser("segment", help="segment a query volume")
    seg.add_argument("--query", required=True, type=Path, help="volume to segment (NIfTI, NRRD, MHA, DICOM folder)")
    seg.add_argument("--out", required=True, type=Path, help="output label map (.nii.gz, .nrrd, .mha or .seg.nrrd)")
    seg.add_argument("--report", type=Path, help="JSON report (default: beside --out, named *_report.json)")
    pr = seg.add_argument_group("propagate")
    pr.add_argument("--prompt-labels", type=Path, help="label file on the query's grid with masks on some slices")
    pr.add_argument("--labels", help="comma-separated label values to use from --prompt-labels (default all)")
    pr.add_argument("--prompts", type=Path, help="JSON file with boxes/points in voxel coordinates")
    fs = seg.add_argument_group("matched support (few-shot)")
    fs.add_argument("--support", nargs=2, action="append", type=Path, metavar=("IMAGE", "LABELS"),
                    help="a labelled support case; repeat for several")
    fs.add_argument("--scheme", default="video+memory", choices=SCHEMES,
                    help="how matched supports condition SAM2 (default video+memory)")
    fs.add_argument("--augmentations", type=int, default=4, help="augmented copies per support slice (default 4)")
    fs.add_argument("--slices-per-structure", type=int, default=8, help="support slices per structure (default 8)")
    fs.add_argument("--features", default="sam2", choices=FEATURES, help="similarity features")
    fs.add_argument("--top-k", type=int, default=3, help="support memories per query slice (default 3)")
    fs.add_argument("--extent", default="largest-run", choices=EXTENTS,
                    help="where each structure starts and ends: its longest run of slices SAM2 accepts "
                         "(default), or every slice its object score accepts")
    fs.add_argument("--position-weight", type=float, default=0.0,
                    help="penalty on relative slice position difference in matching (default 0)")
    add_retrieval_args(fs)
    add_guided_args(seg.add_argument_group("support-guided prompts, registration, LoRA (with --support)"))
    add_model_args(seg)
    add_frame_args(seg)
    return seg


def add_retrieval_args(group) -> None:
    """`segment --library DIR` options (with the few-shot group's --top-k and --extent)."""
    from ..library.sync import feature_names

    group.add_argument("--library", type=_existing, metavar="DIR",
                       help="retrieval: a labelled library (folder or list file); each query slice is "
                            "conditioned on its --top-k most similar library slices")
    group.add_argument("--library-features", default="sam2", choices=feature_names(),
                       help="retrieval descriptors (default sam2)")
    group.add_argument("--position-window", type=float, metavar="W",
                       help="retrieval: prefer library slices whose relative position differs by at most W (0..1)")


def _existing(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"library {path} does not exist")
    return path


def add_guided_args(group) -> None:
    group.add_argument("--method", choices=list(METHODS),
                       help="with --support: matched-support (default), guided (a prior's pseudo-mask on each "
                            "slice prompts SAM2) or registration (registered support labels alone: CPU only, "
                            "no model or weights needed); with --library: retrieval; with prompts: propagate")
    group.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a method parameter without an option of its own (VALUE as JSON, else text; "
                            "NAME.FIELD for a nested group, e.g. fewshot.neighbours=2); repeat for several")
    group.add_argument("--prior", default="registration", choices=PRIORS,
                       help="guided: pseudo-masks from registering the supports (default) or from SAM2 with "
                            "support memories and no prompt on the query slice")
    group.add_argument("--prior-scheme", default="video", choices=["pair", "video"],
                       help="guided with --prior sam2: how support memories condition it (default video)")
    group.add_argument("--prompt-type", default="box+mask", choices=PROMPT_TYPES,
                       help="guided: the pseudo-mask's box, the pseudo-mask as a dense hint SAM2 refines, "
                            "or both (default)")
    group.add_argument("--box-margin", type=int, default=5, help="guided: pixels added around each box (default 5)")
    group.add_argument("--transform", default="affine", choices=TRANSFORMS,
                       help="registration (method or prior): affine (default) or affine_bspline")
    group.add_argument("--fusion", default="weighted", choices=FUSION_METHODS,
                       help="registration with several supports: how warped labels are fused (default weighted)")
    group.add_argument("--lora-steps", type=int, default=0,
                       help="guided: first fit LoRA adapters on the supports' augmented slices for N steps "
                            "(0: off, the default; adapters are cached per support set)")
    group.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (default 4)")
    group.add_argument("--lora-decoder", action="store_true",
                       help="LoRA on the mask decoder's attention too, not only the image encoder's")


def segment_method(args: argparse.Namespace) -> str:
    """The method the options ask for; options that contradict each other fail here, before any work."""
    given = {SUPPORTS: bool(args.support), LIBRARY: args.library is not None,
             PROMPTS: args.prompt_labels is not None or args.prompts is not None}
    kinds = [kind for kind, present in given.items() if present]
    if len(kinds) > 1:
        raise InputError("give one of --support (matched support), --library (retrieval) or "
                         "--prompt-labels/--prompts (propagate)")
    spec = get_method(args.method) if args.method else None
    if spec is not None and not given[spec.inputs]:
        raise InputError(f"--method {spec.key} needs {INPUT_OPTIONS[spec.inputs]}")
    if not kinds:
        raise InputError("nothing to segment from: give --support, --library, --prompt-labels or --prompts")
    method = spec.key if spec is not None else DEFAULT_METHODS[kinds[0]]
    if args.lora_steps and method != "guided":
        raise InputError("--lora-steps works with --method guided")
    return method


def method_params(method: str, args: argparse.Namespace) -> dict:
    """The method's parameters from the options (seeds come from --seed through the request's model)."""
    fewshot = {"augmentations": args.augmentations, "slices_per_structure": args.slices_per_structure,
               "features": args.features, "top_k": args.top_k, "extent": args.extent,
               "position_weight": args.position_weight}
    registration = {"transform": args.transform, "fusion": args.fusion}
    options = {
        "propagate": {},
        "matched-support": {"scheme": args.scheme, **fewshot},
        "retrieval": {"features": args.library_features, "top_k": args.top_k, "window": args.position_window,
                      "extent": args.extent},
        "registration": registration,
        "guided": {"prior": args.prior, "prompt_type": args.prompt_type, "box_margin": args.box_margin,
                   **registration, "fewshot": {"scheme": args.prior_scheme, **fewshot},
                   "lora": {"steps": args.lora_steps, "rank": args.lora_rank, "decoder": args.lora_decoder}},
    }
    params = options.get(method, {})  # a method without options of its own: its defaults, and --param
    for item in args.param:
        name, value = parse_param(item)
        *groups, last = name.split(".")
        target = params
        for group in groups:
            target = target.setdefault(group, {})
            if not isinstance(target, dict):
                raise InputError(f"--param {item}: {group} is not a group of parameters")
        target[last] = value
    return params


def parse_param(item: str) -> tuple[str, object]:
    """'top_k=2' -> ('top_k', 2); the value is JSON when it parses as JSON, else the text itself."""
    name, sep, text = item.partition("=")
    if not sep or not name.strip():
        raise InputError(f"--param takes NAME=VALUE, got '{item}'")
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return name.strip(), value


def label_values(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--labels takes comma-separated label values such as 1,3, got '{text}'") from None


def request_from_args(args: argparse.Namespace) -> Request:
    method = segment_method(args)
    return Request(method=method, query=args.query, out=args.out, report=args.report or default_report_path(args.out),
                   prompt_labels=args.prompt_labels, values=label_values(args.labels), prompts=args.prompts,
                   supports=tuple(args.support or ()), library=args.library, model=model_options(args),
                   frames=frame_options(args), params=method_params(method, args))


def run_segment(args: argparse.Namespace) -> int:
    from ..run.outputs import write_outputs
    from ..run.runner import Runner
    from .console import ConsoleProgress

    request = request_from_args(args)
    runner, progress = Runner(), ConsoleProgress(enabled=not args.quiet)
    try:
        labels, report = runner.run(request, progress)
    finally:
        progress.close()
        runner.close()
    write_outputs(labels, report, request.out, request.report)
    print(f"wrote {request.out} and {request.report} ({report['timing']['total_s']:.1f} s, "
          f"{report['timing']['per_slice_s']:.3f} s per slice)")
    return 0
