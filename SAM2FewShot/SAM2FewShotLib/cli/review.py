"""`sam2fewshot review OUT`: a cohort's review queue, and decisions recorded from a script."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_command, add_console_args


def add_review_parser(sub) -> None:
    p = add_command(sub, "review", "a cohort's review queue: what to look at first; record decisions",
                    description="Prints the cases of a batch output folder in the order to review them: failed "
                                "first, then by need (share of low-confidence slices + SAM2's doubt + volume off "
                                "the cohort median, each 0-1), then not run, then reviewed. A decision is "
                                "written into the folder under its lock; a reviewed case is never redone by batch.")
    p.add_argument("out", type=Path, metavar="OUT", help="the --out folder of a batch run")
    p.add_argument("--json", action="store_true", help="print the queue as JSON")
    decide = p.add_mutually_exclusive_group()
    decide.add_argument("--accept", metavar="ID", help="record the case's result as accepted")
    decide.add_argument("--reject", metavar="ID", help="record the case's result as rejected")
    decide.add_argument("--correct", nargs=2, metavar=("ID", "LABELS"),
                        help="record a correction: LABELS (on the result's grid) is kept as corrected/<id>")
    p.add_argument("--reviewer", default="", help="who decided (kept in the record)")
    add_console_args(p)


def run_review(args: argparse.Namespace) -> int:
    from ..batch.review import record_review, review_queue

    if args.accept or args.reject or args.correct:
        case_id, decision, corrected = _decision(args)
        review = record_review(args.out, case_id, decision, corrected, args.reviewer)
        print(f"{case_id}: {review['decision']} ({review['time']})")
        return 0
    rows = review_queue(args.out)
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=1))
        return 0
    print(f"{'case':<24} {'status':<10} {'score':>6}  why")
    for r in rows:
        why = r.error if r.status == "failed" else "; ".join(r.reasons)
        score = f"{r.score:.2f}" if r.score is not None else ""
        print(f"{r.case:<24} {r.status:<10} {score:>6}  {why}")
    return 0


def _decision(args: argparse.Namespace) -> tuple:
    if args.correct:
        from ..io.volume_io import read_labels

        case_id, labels = args.correct
        return case_id, "corrected", read_labels(labels)
    return (args.accept, "accepted", None) if args.accept else (args.reject, "rejected", None)
