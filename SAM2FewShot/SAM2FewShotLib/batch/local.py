"""A cohort on this machine: one Runner keeps the model and the support features warm for every
case, and the next query is read and normalised while the model works on the current one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..common.progress import DOWNLOAD, LOAD_MODEL
from ..run.request import Request
from .case import case_request, run_case
from .cohort import Case

PREFETCH_WAIT_S = 600.0  # the next query is read once the current case has started computing


def run_local(cases: Sequence[Case], template: Request, folder: Path, suffix: str, options: str,
              on_record: Callable[[Case, dict], None], on_stage: Callable[[str], None] = lambda stage: None,
              tolerance_mm: float = 1.0, adoptable: Collection[str] = ()) -> None:
    """Run the cases in order; ``on_record`` gets each case's manifest record as soon as it is known.
    ``adoptable``: the ids whose complete outputs on disk may be taken as they are (Manifest.may_adopt)."""
    from ..run.runner import Runner

    runner = Runner(max_sessions=2)  # the case being computed and the one read ahead
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam2fewshot-prefetch") as pool:
        try:
            for n, case in enumerate(cases):
                started = threading.Event()

                def progress(stage: str, done: int, total: int, started: threading.Event = started) -> None:
                    if stage not in (LOAD_MODEL, DOWNLOAD):  # the model is there: the query can be read ahead
                        started.set()
                    on_stage(stage)

                if n + 1 < len(cases):
                    upcoming = case_request(template, cases[n + 1], folder, suffix)
                    pool.submit(_prefetch, runner, upcoming, started)
                record = run_case(runner, case, template, folder, suffix, options, progress, tolerance_mm,
                                  adopt=case.id in adoptable)
                started.set()  # a case that computed nothing (failed, or found done) releases the read-ahead
                on_record(case, {**record, "attempts": 1, "worker": "local"})
        finally:
            runner.close()


def _prefetch(runner, request: Request, started: threading.Event) -> None:
    started.wait(PREFETCH_WAIT_S)
    runner.prepare(request)
