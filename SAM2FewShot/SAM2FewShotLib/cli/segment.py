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

from ..common.errors import InputError
from ..methods.options import set_path
from ..methods.presets import PRESETS
from ..methods.registry import LIBRARY, METHODS, PROMPTS, SUPPORTS, get_method
from ..run.outputs import default_report_path
from ..run.request import Request
from . import method_options
from .options import add_command, add_frame_args, add_model_args, frame_options, model_options

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
    """Everything but the query, its prompts and the outputs: the options segment and batch share. Each
    method's options come from the method itself (cli/method_options.py)."""
    anyg = seg.add_argument_group("method")
    anyg.add_argument("--method", choices=list(METHODS),
                      help="with --support: matched-support (the default), guided (a prior's pseudo-mask on each "
                           "slice prompts SAM2) or registration (registered support labels alone: CPU only, no model "
                           "or weights); with --library: retrieval; with prompts: propagate")
    anyg.add_argument("--preset", choices=list(PRESETS),
                      help="a published construction's method and parameters (options given as well change them; the "
                           "report names it and what it does not reproduce): "
                           + "; ".join(p.help() for p in PRESETS.values()))
    anyg.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="a method parameter without an option of its own (VALUE as JSON, else text; NAME.FIELD for a "
             "nested group, e.g. fewshot.neighbours=2); repeat for several")
    groups = {key: seg.add_argument_group(f"{spec.label.lower()} ({spec.summary[0].lower()}{spec.summary[1:-1]})")
              for key, spec in METHODS.items() if spec.inputs != PROMPTS}  # propagate's inputs are above
    first = {kind: next(k for k, spec in METHODS.items() if spec.inputs == kind) for kind in (SUPPORTS, LIBRARY)}
    groups[first[SUPPORTS]].add_argument(
        "--support", nargs=2, action="append", type=Path, metavar=("IMAGE", "LABELS"),
        help="a labelled support case; repeat for several (" + ", ".join(
            k for k, spec in METHODS.items() if spec.inputs == SUPPORTS) + ")")
    groups[first[LIBRARY]].add_argument("--library", type=_existing, metavar="DIR",
                                        help="a labelled library (folder or list file); each query slice is "
                                             "conditioned on its most similar library slices")
    method_options.add_method_options(groups)
    add_model_args(seg)
    add_frame_args(seg, query_frame=True)


def _existing(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"library {path} does not exist")
    return path


def segment_method(args: argparse.Namespace, prompted: bool | None = None) -> str:
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
    method_options.refuse_foreign(method, args)
    return method


def method_params(method: str, args: argparse.Namespace) -> dict:
    """The method's parameters: a preset's, then the options given, then --param (seeds come from --seed
    through the request's model). Options left out keep the method's own defaults."""
    preset = PRESETS[args.preset].params if getattr(args, "preset", None) else {}
    params = method_options.params_for(method, args, preset)
    for item in args.param:
        name, value = parse_param(item)
        try:
            set_path(params, name, value)
        except InputError:
            raise InputError(f"--param {item}: {name.rpartition('.')[0]} is not a group of parameters") from None
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


def label_values(text: str | None) -> tuple[int, ...] | None:
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
                   frames=frame_options(args), params=method_params(method, args),
                   preset=getattr(args, "preset", None))


def template_from_args(args: argparse.Namespace, query, prompted: bool) -> Request:
    """The request every case of a cohort shares (its query and prompt labels are each case's own)."""
    method = segment_method(args, prompted)
    return Request(method=method, query=query, supports=tuple(args.support or ()),
                   library=args.library, model=model_options(args), frames=frame_options(args),
                   params=method_params(method, args), preset=getattr(args, "preset", None))


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
