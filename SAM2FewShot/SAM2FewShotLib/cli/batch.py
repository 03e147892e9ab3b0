"""`sam2fewshot batch`: one set of options over a cohort of queries, resumable, on this machine or Ray."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..common.errors import InputError
from ..methods.registry import get_method
from ..run.outputs import LABEL_SUFFIXES
from .options import add_command
from .segment import add_method_args

EXIT_SOME_FAILED = 1
log = logging.getLogger(__name__)


def add_batch_parser(sub) -> None:
    p = add_command(sub, "batch", "segment a cohort of volumes with one set of options, resumably",
                    description="Segments every volume of a folder (or every row of a CSV with a 'query' column, "
                                "optional 'id', 'labels' and 'prompt_labels') into --out: one label file and "
                                "report per case, a manifest that lets a rerun skip finished cases, and the cohort "
                                "report (cohort.csv, cohort.md, cohort.png). Exit code 1 when a case failed.")
    p.add_argument("--queries", required=True, type=Path, metavar="DIR|LIST.csv", help="the volumes to segment")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--labels", dest="truth", type=Path, metavar="DIR",
                   help="ground truth, found by case name (X.nii.gz, X_label.nii.gz, ...): Dice and HD95 per case")
    p.add_argument("--suffix", default=".nii.gz", choices=list(LABEL_SUFFIXES), help="format of the label files")
    runs = p.add_argument_group("resuming")
    runs.add_argument("--retry-failed", action="store_true", help="run only the cases that failed before")
    runs.add_argument("--force", action="store_true",
                      help="redo cases that were segmented with other options or in another precision (otherwise "
                           "refused)")
    runs.add_argument("--mixed-precision", action="store_true",
                      help="keep cases done in another precision (fp32/bf16) than this run's, rather than refuse")
    ray = p.add_argument_group("Ray (pip install 'sam2fewshot[cluster]')")
    ray.add_argument("--ray", action="store_true", help="run on a new local Ray instance")
    ray.add_argument("--ray-address", metavar="ADDRESS", help="run on an existing Ray cluster, e.g. ray://head:10001")
    ray.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, else one per CPU)")
    ray.add_argument("--max-retries", type=int, default=2, help="times a case is retried when its worker dies")
    add_method_args(p)


def run_batch(args: argparse.Namespace) -> int:
    from ..batch.cohort import find_cases
    from ..batch.lock import FolderLock
    from ..batch.manifest import LOCK, check_case_names
    from ..common.files import writable_folder
    from ..run.runner import check_request
    from .segment import template_from_args

    cases = find_cases(args.queries, args.truth)
    prompted = any(c.prompt_labels for c in cases)
    template = template_from_args(args, cases[0].query, prompted)
    if template.method == "propagate" and not all(c.prompt_labels for c in cases):
        raise InputError("propagate needs a prompt_labels column with a file for every case of the CSV")
    check_request(replace(template, query=str(cases[0].query), prompt_labels=cases[0].prompt_labels))
    if args.workers is not None and args.workers < 1:
        raise InputError("--workers must be at least 1")
    if (args.workers or args.ray_address) and not args.ray and not args.ray_address:
        raise InputError("--workers is for Ray: add --ray or --ray-address")
    if not writable_folder(args.out):
        raise InputError(f"cannot write into {args.out}: it cannot be made, or it is not writable")
    check_case_names(cases, args.suffix)
    with FolderLock(args.out, LOCK):  # one writer per folder: a second run is refused, naming this one
        return _run_locked(args, cases, template)


def _run_locked(args: argparse.Namespace, cases, template) -> int:
    from ..batch.case import add_missing_scores, check_case_outputs
    from ..batch.cohort_report import write_report
    from ..batch.compute import actor_compute, local_compute, pinned
    from ..batch.conditioning import conditioning_of
    from ..batch.manifest import Manifest, legacy_options_digest, options_digest

    manifest = Manifest.open(args.out)
    check_case_outputs(cases, template, args.out, args.suffix)
    options, conditioning = options_digest(template), conditioning_of(template)
    with _backend(args) as gpus:
        needs_model = get_method(template.method).needs_model
        compute = actor_compute(template.model, gpus) if _on_ray(args) else local_compute(template.model, needs_model)
        template = pinned(template, compute)  # every case of this run at one precision and thread count
        todo = plan(cases, manifest, (options, legacy_options_digest(template), conditioning), args, compute)
        manifest.conditioning[conditioning.digest] = [list(m) for m in conditioning.members]
        start = time.perf_counter()
        run_cases(todo, template, args, manifest, options, compute,
                  lambda record: record.update(conditioning=conditioning.digest))
    add_missing_scores(cases, manifest.cases, args.out)
    manifest.save()
    paths = write_report(cases, manifest.cases, args.out, time.perf_counter() - start)
    failed = [c.id for c in cases if manifest.cases.get(c.id, {}).get("status") == "failed"]
    done = sum(manifest.cases.get(c.id, {}).get("status") == "done" for c in cases)
    reviewed = sum(bool(manifest.cases.get(c.id, {}).get("review")) for c in cases)
    print(f"{done} of {len(cases)} cases done ({reviewed} reviewed), {len(failed)} failed; {len(todo)} run now, "
          f"{len(cases) - len(todo)} left as they were; wrote {', '.join(str(p) for p in paths)}")
    if failed:
        print(f"sam2fewshot: {len(failed)} case(s) failed (see {args.out / 'cohort.md'}): {', '.join(failed[:5])}"
              + (", ..." if len(failed) > 5 else ""), file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def _on_ray(args: argparse.Namespace) -> bool:
    return bool(args.ray or args.ray_address)


@contextmanager
def _backend(args: argparse.Namespace) -> Iterator[int]:
    """Ray for the run when asked for (yields its GPU count), else nothing to start (0)."""
    if not _on_ray(args):
        yield 0
        return
    from ..batch.manifest import LOGS
    from ..batch.on_ray import ray_session

    with ray_session(args.ray_address, args.workers, logs=args.out / LOGS, quiet=args.quiet) as gpus:
        yield gpus


def plan(cases, manifest, digests: tuple, args: argparse.Namespace, compute) -> list:
    """The cases to run now. Reviewed cases are never touched; cases conditioned on a library (or support
    set) that has grown since are redone; cases done with other options, or in another precision than
    ``compute``, are refused unless --force (or --mixed-precision, which keeps the latter).
    ``digests``: this run's options digest, the legacy one, and its Conditioning."""
    from ..batch.compute import other_precision, refuse_mixed_precision, say_other_threads

    options, legacy, conditioning = digests
    status = {c.id: manifest.status(c, options, conditioning, legacy) for c in cases}
    other = [c.id for c in cases if status[c.id] == "other options"]
    if other and not args.force:
        raise InputError(f"{len(other)} case(s) in {args.out} were segmented with other options (e.g. {other[0]}): "
                         "add --force to redo them with these, or give another --out")
    grown = [c.id for c in cases if status[c.id] == "grown"]
    if grown:
        print(f"{conditioning.kind} grew: {len(grown)} unreviewed case(s) to redo")
    done = {c.id: manifest.cases[c.id] for c in cases if status[c.id] == "done"}
    mixed = {} if args.mixed_precision else other_precision(done, compute)
    if mixed and not args.force:
        refuse_mixed_precision(mixed, compute, args.out)
    status.update({case: "other options" for case in mixed})
    say_other_threads({k: v for k, v in done.items() if k not in mixed}, compute, args.out,
                      "this run on Ray" if _on_ray(args) else "this run")
    if args.retry_failed:
        return [c for c in cases if status[c.id] == "failed"]
    return [c for c in cases if status[c.id] in ("todo", "other options", "grown")]


def run_cases(todo, template, args: argparse.Namespace, manifest, options: str, compute,
              stamp=lambda record: None) -> None:
    """Run ``todo``; each record goes into the manifest as soon as it is known, ``stamp`` adding what this
    run's driver knows (what the cases were conditioned on)."""
    bar = _progress_bar(len(todo), args.quiet)
    failures, said = 0, set()
    adoptable = {c.id for c in todo if manifest.may_adopt(c)}  # outputs the manifest does not record yet

    def on_record(case, record: dict) -> None:
        nonlocal failures
        stamp(record)
        manifest.record(case.id, record)
        failures += record["status"] == "failed"
        ran = record.get("compute")
        if ran and ran != compute.as_json() and str(ran) not in said:  # e.g. an actor on another kind of host
            said.add(str(ran))
            log.warning("%s ran with %s, where this run pinned %s", case.id, _words(ran), _words(compute.as_json()))
        bar.set_postfix_str(f"failed {failures}" if failures else "", refresh=False)
        if bar.n + 1 < bar.total:
            bar.update(1)
        else:
            bar.n += 1  # the last one: close() draws the final line, once

    try:
        if _on_ray(args):
            from ..batch.on_ray import run_on_ray

            run_on_ray(todo, template, args.out, args.suffix, options, on_record, workers=args.workers,
                       max_retries=args.max_retries, adoptable=adoptable)
        else:
            from ..batch.local import run_local

            run_local(todo, template, args.out, args.suffix, options, on_record, adoptable=adoptable,
                      on_stage=lambda stage: bar.set_description(f"cohort ({stage})", refresh=False))
    finally:
        bar.close()


class _Quiet:
    """The bar of a quiet run: counts like tqdm's and draws nothing (and a quiet run needs no tqdm: the
    module's self-test runs a cohort in a Slicer where nothing was installed)."""

    def __init__(self, total: int):
        self.n, self.total = 0, total

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, quiet: bool):
    if quiet:
        return _Quiet(total)
    from tqdm import tqdm

    return tqdm(total=total, desc="cohort", unit="case", file=sys.stderr, dynamic_ncols=True)


def _words(compute: dict) -> str:
    return f"{compute.get('precision')}, {compute.get('threads')} thread(s) on {compute.get('device')}"
