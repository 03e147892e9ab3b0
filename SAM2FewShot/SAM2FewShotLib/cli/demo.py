"""sam2fewshot demo: the main job on example data, from a fresh machine to a Dice score.

A query hippocampus MRI (hippocampus_015) is segmented from one labelled support case
(hippocampus_184) with matched support, or with registration (no weights); only once the result is
there is the query's ground truth read, to print the Dice per structure. What cannot be had
offline (the data, the weights) is said in one message with the next command that works.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from ..common.errors import InputError, ModelError
from ..common.files import writable_folder
from ..io.example_data import DEMO_QUERY, DEMO_SUPPORT
from ..methods.matched_support import FewShotParams
from ..methods.options import SCHEME
from ..run.request import Request
from .options import add_command, add_frame_args, add_model_args, frame_options, model_options
from .segment import announce

COMMAND_ENV = "SAM2FEWSHOT_COMMAND"  # how the user started the demo (quickstart.sh sets it), for advice


def add_demo_parser(sub) -> None:
    p = add_command(sub, "demo", "segment an example query from a support case and print the Dice",
                    description=f"Segments {DEMO_QUERY} from the labelled case {DEMO_SUPPORT} of the Medical "
                                "Segmentation Decathlon hippocampus task (downloaded once, or from --data) and "
                                "prints the Dice of each structure against the query's ground truth.")
    p.add_argument("--data", type=Path, metavar="FOLDER",
                   help="a folder with the MSD hippocampus cases, for machines that cannot download (default: "
                        "download once into the user cache)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    p.add_argument("--query-case", default=DEMO_QUERY, help="case name of the query")
    p.add_argument("--support-case", default=DEMO_SUPPORT, help="case name of the support")
    p.add_argument("--method", default="matched-support", choices=["matched-support", "registration"],
                   help="matched support (SAM2), or registration (CPU only, needs no model weights)")
    p.add_argument(SCHEME.flag, choices=SCHEME.choices, help=f"{SCHEME.help} (default: {FewShotParams.scheme})")
    add_model_args(p)
    add_frame_args(p)


def run_demo(args: argparse.Namespace) -> int:
    from ..bench.metrics import dice_per_label
    from ..common.names import file_name
    from ..io.volume_io import read_labels
    from ..run.outputs import write_outputs
    from ..run.runner import Runner
    from .console import ConsoleProgress

    cases, names = _cases(args)
    for n in (args.query_case, args.support_case):
        if n not in cases:
            shown = ", ".join(sorted(cases)[:6]) + (", ..." if len(cases) > 6 else "")
            raise InputError(f"no case named {n} in the example data ({shown}): choose the cases with "
                             "--query-case and --support-case")
    out = args.out / f"{file_name(f'{args.query_case}_from_{args.support_case}')}.seg.nrrd"  # names, not paths
    report_path = out.with_name(out.name.replace(".seg.nrrd", "_report.json"))
    if not writable_folder(args.out):
        raise InputError(f"cannot write into {args.out}: it cannot be made, or it is not writable")
    request = Request(method=args.method, query=cases[args.query_case][0], supports=(cases[args.support_case],),
                      model=model_options(args), frames=frame_options(args),
                      params={"scheme": args.scheme} if args.method == "matched-support" and args.scheme else {})
    runner, progress = Runner(), ConsoleProgress(enabled=not args.quiet)
    try:
        labels, report = runner.run(request, progress)
    except ModelError as exc:
        raise InputError(f"{exc}. {_next_steps(args, weights=True)}") from None
    finally:
        progress.close()
        runner.close()
    labels, report = named(labels, report, names)
    truth = read_labels(cases[args.query_case][1], reference=labels.volume)  # read only now, for the score
    scores = dice_per_label(labels.volume.array, truth.volume.array, [s.value for s in labels.segments])
    report["demo"] = {"query": args.query_case, "support": args.support_case,
                      "dice": {labels.segment(v).name: round(d, 4) for v, d in scores.items()}}
    _write(labels, report, out, report_path, write_outputs)
    model = report["model"]
    print(f"query {args.query_case}, support {args.support_case}, method {args.method}, "
          f"model {model['name'] or 'none'} ({model['weights'] or 'no weights needed'})")
    for v, d in scores.items():
        print(f"  {labels.segment(v).name:<24} Dice {d:.3f}")
    print(f"wrote {announce(out, report_path)} "
          f"({report['timing']['total_s']:.1f} s, {report['timing']['per_slice_s']:.3f} s per slice)")
    return 0


def _cases(args: argparse.Namespace):
    """The example cases and their structure names; a failed download says what to run instead."""
    from ..io.example_data import example_cases, structure_names

    if args.data is None:
        from ..common.cache import require_cache

        require_cache()  # the example data are downloaded there
    try:
        cases = example_cases(args.data)
    except InputError as exc:
        if args.data is not None:
            raise
        raise InputError(f"{exc}. {_next_steps(args, weights=False)}") from None
    return cases, structure_names(args.data)


def _next_steps(args: argparse.Namespace, weights: bool) -> str:
    """The commands that work without what is missing: the model weights (``weights``), else the data."""
    from ..sam2.weights import is_cached

    command = os.environ.get(COMMAND_ENV) or "sam2fewshot demo"
    data = f"--data {args.data}" if args.data is not None else "--data FOLDER"
    without_weights = ("--checkpoint FILE (SAM2 weights you have), or --random-weights (checks the installation; "
                       "its masks are meaningless), or --method registration (needs no weights)")
    if weights:
        return f"Next: {command} {data} with {without_weights}"
    have_weights = args.random_weights or args.checkpoint or args.method == "registration" or is_cached(args.model)
    step = f"Next: {command} --data FOLDER (a folder with the MSD hippocampus cases)"
    return step if have_weights else f"{step}; no weights are cached either, so add {without_weights}"


def named(labels, report: dict, names: dict[int, str]):
    """The result with the dataset's structure names (the example label files carry none)."""
    from ..io.volume import LabelMap

    renamed = {s.name: names[s.value] for s in labels.segments if s.value in names}
    segments = tuple(replace(s, name=renamed.get(s.name, s.name)) for s in labels.segments)
    for seg in report.get("segments", []):
        seg["name"] = renamed.get(seg["name"], seg["name"])
    for entry in report.get("slices", []):
        entry["objects"] = {renamed.get(k, k): v for k, v in entry["objects"].items()}
    return LabelMap(labels.volume, segments), report


def _write(labels, report: dict, out: Path, report_path: Path, write_outputs) -> None:
    """The outputs, in a folder made only now: a run that failed leaves no empty folder behind."""
    folder = out.parent
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        write_outputs(labels, report, out, report_path)
    except BaseException:
        if made and not any(folder.iterdir()):
            folder.rmdir()
        raise
