"""sam2fewshot demo: the main job on example data, from a fresh machine to a Dice score.

A query hippocampus MRI is segmented from one labelled support case (matched support); only
once the result is there is the query's ground truth read, to print the Dice per structure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.errors import InputError
from ..run.request import Request
from .options import add_frame_args, add_model_args, frame_options, model_options


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="segment an example query from a support case and print the Dice")
    p.add_argument("--data", type=Path, help="folder with the MSD hippocampus cases (default: download and cache)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--query-case", help="case name of the query (default: the first case)")
    p.add_argument("--support-case", help="case name of the support (default: the second case)")
    p.add_argument("--scheme", default="video+memory", choices=["pair", "video", "video+memory"])
    add_model_args(p)
    add_frame_args(p)


def run_demo(args: argparse.Namespace) -> int:
    from ..bench.metrics import dice_per_label
    from ..io.example_data import example_cases
    from ..io.volume_io import read_labels
    from ..run.outputs import write_outputs
    from ..run.runner import Runner
    from .console import ConsoleProgress

    cases = example_cases(args.data)
    names = sorted(cases)
    if len(names) < 2:
        raise InputError("the demo needs at least two labelled cases")
    query_name = args.query_case or names[0]
    support_name = args.support_case or next(n for n in names if n != query_name)
    for n in (query_name, support_name):
        if n not in cases:
            raise InputError(f"no case named {n} (cases: {', '.join(names)})")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{query_name}_from_{support_name}.seg.nrrd"
    request = Request(method="matched-support", query=cases[query_name][0], supports=(cases[support_name],), out=out,
                      report=out.with_name(out.name.replace(".seg.nrrd", "_report.json")), model=model_options(args),
                      frames=frame_options(args), params={"scheme": args.scheme})
    runner, progress = Runner(), ConsoleProgress(enabled=not args.quiet)
    try:
        labels, report = runner.run(request, progress)  # says plainly when no weights can be had
    finally:
        progress.close()
        runner.close()
    truth = read_labels(cases[query_name][1], reference=labels.volume)  # read only now, for the score
    scores = dice_per_label(labels.volume.array, truth.volume.array, [s.value for s in labels.segments])
    report["demo"] = {"query": query_name, "support": support_name,
                      "dice": {labels.segment(v).name: round(d, 4) for v, d in scores.items()}}
    write_outputs(labels, report, request.out, request.report)
    model = report["model"]
    print(f"query {query_name}, support {support_name}, model {model['name']} ({model['weights']})")
    for v, d in scores.items():
        print(f"  {labels.segment(v).name:<24} Dice {d:.3f}")
    print(f"wrote {out} ({report['timing']['total_s']:.1f} s, {report['timing']['per_slice_s']:.3f} s per slice)")
    return 0
