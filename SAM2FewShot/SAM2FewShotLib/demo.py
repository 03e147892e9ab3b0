"""sam2fewshot demo: the main job on example data, from a fresh machine to a Dice score.

A query hippocampus MRI is segmented from one labelled support case (matched support); only
after the result is written is the query's ground truth read, to print the Dice per structure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import InputError


def add_demo_parser(sub) -> None:
    from .cli import add_frame_args, add_model_args

    p = sub.add_parser("demo", help="segment an example query from a support case and print the Dice")
    p.add_argument("--data", type=Path, help="folder with the MSD hippocampus cases (default: download and cache)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--query-case", help="case name of the query (default: the first case)")
    p.add_argument("--support-case", help="case name of the support (default: the second case)")
    p.add_argument("--scheme", default="video+memory", choices=["pair", "video", "video+memory"])
    add_model_args(p)
    add_frame_args(p)


def run_demo(args: argparse.Namespace) -> int:
    from .cli import load_model
    from .example_data import example_cases
    from .metrics import dice_per_label
    from .json_io import write_json_atomic
    from .segment_fewshot import FewShotParams, segment_fewshot
    from .session import VolumeSession
    from .console import ConsoleProgress
    from .normalization import Normalization
    from .volume_io import read_labels, read_volume, write_labels

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

    query = read_volume(cases[query_name][0])
    support = (read_volume(cases[support_name][0]), read_labels(cases[support_name][1]))
    predictor, model_info = load_model(args)  # says plainly when no weights can be had
    session = VolumeSession(predictor, query, args.axis,
                            Normalization.parse(args.normalization, per_slice=args.per_slice_normalization))
    progress = ConsoleProgress(enabled=not args.quiet)
    try:
        labels, report = segment_fewshot(session, [support], FewShotParams(scheme=args.scheme, seed=args.seed),
                                         progress=progress)
    finally:
        progress.close()
    write_labels(labels, out)
    truth = read_labels(cases[query_name][1], reference=query)  # read only now, for the score
    scores = dice_per_label(labels.volume.array, truth.volume.array, [s.value for s in labels.segments])
    report["model"] = model_info
    report["demo"] = {"query": query_name, "support": support_name,
                      "dice": {labels.segment(v).name: round(d, 4) for v, d in scores.items()}}
    write_json_atomic(report, out.with_name(out.name.replace(".seg.nrrd", "_report.json")))
    print(f"query {query_name}, support {support_name}, model {model_info['name']} ({model_info['weights']})")
    for v, d in scores.items():
        print(f"  {labels.segment(v).name:<24} Dice {d:.3f}")
    print(f"wrote {out} ({report['timing']['total_s']:.1f} s, {report['timing']['per_slice_s']:.3f} s per slice)")
    return 0
