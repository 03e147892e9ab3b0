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

from ..common.choices import (
    EXTENTS,
    FUSION_METHODS,
    LIBRARY_FEATURES,
    PRIORS,
    PROMPT_TYPES,
    SCHEMES,
    SIMILARITY_FEATURES,
    TRANSFORMS,
)
from ..common.errors import InputError
from ..methods.presets import PRESETS
from ..methods.registry import LIBRARY, METHODS, PROMPTS, SUPPORTS, get_method
from ..run.outputs import default_report_path
from ..run.request import Request
from .options import add_command, add_frame_args, add_model_args, frame_options, model_options

# Options that belong to some methods: given with another, they would be silently ignored, so they are refused.
OPTION_METHODS = {
    "scheme": ("matched-support",), "augmentations": ("matched-support", "guided"),
    "slices_per_structure": ("matched-support", "guided"), "features": ("matched-support", "guided"),
    "top_k": ("matched-support", "retrieval", "guided"), "extent": ("matched-support", "retrieval", "guided"),
    "position_weight": ("matched-support", "guided"), "library_features": ("retrieval",),
    "position_window": ("retrieval",), "prior": ("guided",), "prior_scheme": ("guided",),
    "prompt_type": ("guided",), "box_margin": ("guided",), "lora_steps": ("guided",), "lora_rank": ("guided",),
    "lora_decoder": ("guided",), "transform": ("registration", "guided"), "fusion": ("registration", "guided"),
    "labels": ("propagate",),
}
# The option that gives each kind of conditioning, and the method it runs by default.
INPUT_OPTIONS = {SUPPORTS: "--support", LIBRARY: "--library", PROMPTS: "--prompt-labels or --prompts"}
DEFAULT_METHODS = {SUPPORTS: "matched-support", LIBRARY: "retrieval", PROMPTS: "propagate"}


def add_segment_parser(sub) -> argparse.ArgumentParser:
    seg = add_command(sub, "segment", "segment a query volume",
                      description="Segment a query volume: propagate prompts drawn on it, or transfer the "
                                  "structures of labelled support cases (matched support, guided, registration) "
                                  "or of a library (retrieval). Writes the label map, its names and colours, and "
                                  "a JSON report.")
    seg.add_argument("--query", required=True, type=Path, help="volume to segment (NIfTI, NRRD, MHA, DICOM folder)")
    seg.add_argument("--out", required=True, type=Path,
                     help="output label map: .seg.nrrd (names and colours inside), or .nii.gz/.nii/.nrrd/.mha "
                          "(names and colours in a .json beside it)")
    seg.add_argument("--report", type=Path, help="JSON report (default: beside --out, named *_report.json)")
    pr = seg.add_argument_group("propagate (--prompt-labels and/or --prompts)")
    pr.add_argument("--prompt-labels", type=Path, metavar="FILE",
                    help="a label file on the query's grid with masks on some slices")
    pr.add_argument("--labels", metavar="V,V,...", help="label values to use from --prompt-labels (default: all)")
    pr.add_argument("--prompts", type=Path, metavar="FILE", help="a JSON file of boxes/points in voxel coordinates")
    add_method_args(seg)
    return seg


def add_method_args(seg: argparse.ArgumentParser) -> None:
    """Everything but the query, its prompts and the outputs: the options segment and batch share."""
    fs = seg.add_argument_group("matched support (--support; also the guided sam2 prior)")
    fs.add_argument("--support", nargs=2, action="append", type=Path, metavar=("IMAGE", "LABELS"),
                    help="a labelled support case; repeat for several")
    fs.add_argument("--method", choices=list(METHODS),
                    help="with --support: matched-support (the default), guided (a prior's pseudo-mask on each "
                         "slice prompts SAM2) or registration (registered support labels alone: CPU only, no model "
                         "or weights); with --library: retrieval; with prompts: propagate")
    fs.add_argument("--scheme", default="video+memory", choices=SCHEMES, help="how matched supports condition SAM2")
    fs.add_argument("--augmentations", type=int, default=4, help="augmented copies per support slice")
    fs.add_argument("--slices-per-structure", type=int, default=8, help="support slices per structure")
    fs.add_argument("--features", default="sam2", choices=SIMILARITY_FEATURES,
                    help="how support and query slices are compared: SAM2's encoder features or intensity")
    fs.add_argument("--top-k", type=int, default=3, help="support (or library) memories per query slice")
    fs.add_argument("--extent", default="largest-run", choices=EXTENTS,
                    help="where each structure starts and ends: its longest run of slices SAM2 accepts, or every "
                         "slice its object score accepts (also retrieval)")
    fs.add_argument("--position-weight", type=float, default=0.0,
                    help="penalty on the difference in relative slice position when matching")
    rt = seg.add_argument_group("retrieval (--library; with --top-k and --extent above)")
    rt.add_argument("--library", type=_existing, metavar="DIR",
                    help="a labelled library (folder or list file); each query slice is conditioned on its most "
                         "similar library slices")
    rt.add_argument("--library-features", default="sam2", choices=LIBRARY_FEATURES, help="retrieval descriptors")
    rt.add_argument("--position-window", type=float, metavar="W",
                    help="prefer library slices whose relative position differs by at most W (0..1)")
    gd = seg.add_argument_group("guided (--method guided)")
    gd.add_argument("--prior", default="registration", choices=PRIORS,
                    help="pseudo-masks from registering the supports, or from SAM2 with support memories and no "
                         "prompt on the query slice")
    gd.add_argument("--prior-scheme", default="video", choices=["pair", "video"],
                    help="with --prior sam2: how support memories condition it")
    gd.add_argument("--prompt-type", default="box+mask", choices=PROMPT_TYPES,
                    help="the pseudo-mask's box, the pseudo-mask as a dense hint SAM2 refines, or both")
    gd.add_argument("--box-margin", type=int, default=5, help="pixels added around each box")
    gd.add_argument("--lora-steps", type=int, default=0,
                    help="first fit LoRA adapters on the supports' augmented slices for N steps (0: off; adapters "
                         "are cached per support set; needs the lora extra)")
    gd.add_argument("--lora-rank", type=int, default=4, help="LoRA rank")
    gd.add_argument("--lora-decoder", action="store_true",
                    help="LoRA on the mask decoder's attention too, not only the image encoder's")
    rg = seg.add_argument_group("registration (--method registration, and guided's registration prior)")
    rg.add_argument("--transform", default="affine", choices=TRANSFORMS, help="affine, or affine then B-spline")
    rg.add_argument("--fusion", default="weighted", choices=FUSION_METHODS,
                    help="how the warped labels of several supports are fused")
    anyg = seg.add_argument_group("any method")
    anyg.add_argument("--preset", choices=list(PRESETS),
                      help="a published construction's method and parameters (options given as well change them): "
                           + "; ".join(f"{p.name}: {p.title}, {p.method} method" for p in PRESETS.values()))
    anyg.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="a method parameter without an option of its own (VALUE as JSON, else text; NAME.FIELD for a "
             "nested group, e.g. fewshot.neighbours=2); repeat for several")
    add_model_args(seg)
    add_frame_args(seg, query_frame=True)
    seg.set_defaults(option_defaults={a.dest: a.default for a in seg._actions if a.dest in OPTION_METHODS})


def _existing(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"library {path} does not exist")
    return path


def segment_method(args: argparse.Namespace, prompted: Optional[bool] = None) -> str:
    """The method the options ask for; options that contradict each other fail here, before any work.
    ``prompted``: whether prompts are given (default: --prompt-labels or --prompts)."""
    if prompted is None:
        prompted = args.prompt_labels is not None or args.prompts is not None
    given = {SUPPORTS: bool(args.support), LIBRARY: args.library is not None, PROMPTS: prompted}
    kinds = [kind for kind, present in given.items() if present]
    if len(kinds) > 1:
        raise InputError("give one of --support (matched support), --library (retrieval) or "
                         "--prompt-labels/--prompts (propagate)")
    spec = get_method(args.method) if args.method else None
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else None
    if preset is not None:
        if spec is not None and spec.key != preset.method:
            raise InputError(f"--preset {preset.name} runs the {preset.method} method, not {spec.key}: "
                             "leave --method out")
        spec = get_method(preset.method)
        if not given[spec.inputs]:
            raise InputError(f"--preset {preset.name} needs {INPUT_OPTIONS[spec.inputs]}")
    if spec is not None and not given[spec.inputs]:
        raise InputError(f"--method {spec.key} needs {INPUT_OPTIONS[spec.inputs]}")
    if not kinds:
        raise InputError("nothing to segment from: give --support, --library, --prompt-labels or --prompts")
    method = spec.key if spec is not None else DEFAULT_METHODS[kinds[0]]
    if args.lora_steps and method != "guided":
        raise InputError("--lora-steps works with --method guided")
    for dest, default in getattr(args, "option_defaults", {}).items():
        if getattr(args, dest) != default and method not in OPTION_METHODS[dest]:
            option = "--" + dest.replace("_", "-")
            raise InputError(f"{option} does not apply to the {method} method (it is for "
                             f"{' and '.join(OPTION_METHODS[dest])}): leave it out")
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
    if getattr(args, "preset", None):  # the preset's values, except where an option was given
        given = _options_given(args)
        params.update({k: v for k, v in PRESETS[args.preset].params.items() if k not in given})
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


def _options_given(args: argparse.Namespace) -> set[str]:
    """Parameter names set by an option the user changed from its default."""
    names = {"library_features": "features", "position_window": "window"}
    return {names.get(dest, dest) for dest, default in getattr(args, "option_defaults", {}).items()
            if getattr(args, dest) != default}


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


def template_from_args(args: argparse.Namespace, query, prompted: bool) -> Request:
    """The request every case of a cohort shares (its query and prompt labels are each case's own)."""
    method = segment_method(args, prompted)
    return Request(method=method, query=query, supports=tuple(args.support or ()),
                   library=args.library, model=model_options(args), frames=frame_options(args),
                   params=method_params(method, args))


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
    print(f"wrote {announce(request.out, request.report)} ({report['timing']['total_s']:.1f} s, "
          f"{report['timing']['per_slice_s']:.3f} s per slice)")
    return 0


def announce(out, report) -> str:
    """Every file a run wrote, in words: 'r.nii.gz (labels), r.json (names and colours) and r_report.json'."""
    from ..run.outputs import written_files

    labels, *sidecar, report = written_files(out, report)
    parts = [f"{labels} (labels{', names and colours' if not sidecar else ''})"]
    parts += [f"{p} (names and colours)" for p in sidecar]
    return ", ".join(parts) + f" and the report {report}"
