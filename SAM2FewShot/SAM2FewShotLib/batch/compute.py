"""What a cohort computes with: the precision and the torch thread count that actually run its cases.

The same request gives the same label map, bit for bit, only at the same precision and thread count:
bfloat16 rounds otherwise than float32, and the thread count changes the order of some reductions.
So one run of a cohort pins both for all its cases (the threads the machine has free when it starts,
or --threads; on Ray each actor's CPU allotment), every case's record keeps what ran, and a run that
would add cases computed otherwise to those already done says so: in another precision it is refused
unless asked for, with another thread count it is said in one line.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from ..common.errors import InputError
from ..run.request import Request
from ..sam2.build import ModelOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compute:
    precision: str  # "fp32" or "bf16"
    threads: int  # torch CPU threads
    device: str  # "cpu", "cuda" or "mps"

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def local_compute(model: ModelOptions, needs_model: bool = True) -> Compute:
    """What this machine runs a cohort with: the precision its device resolves to, and the threads asked
    for, else the cores other programs leave free now (kept for every case of the run). A method without a
    model (registration) computes in float32 on the CPU and is not asked about torch, which it may not have."""
    if not needs_model:
        return Compute("fp32", model.threads or 1, "cpu")
    from ..sam2.devices import free_cores, resolve_device, resolve_precision

    device = resolve_device(model.device)
    return Compute(resolve_precision(model.precision, device).precision, model.threads or free_cores(), device.type)


def actor_compute(model: ModelOptions, gpus: int) -> Compute:
    """What Ray actors run with: one thread each (each is given one CPU) unless --threads says otherwise; the
    precision their device resolves to, decided here once so that every actor runs the same one."""
    import torch

    from ..sam2.devices import resolve_precision

    device = torch.device("cuda") if gpus else torch.device("cpu")
    if device.type == "cuda":  # this process may have no GPU: CUDA's own default, or what was asked
        precision = "bf16" if model.precision in (None, "auto") else model.precision
    else:
        precision = resolve_precision(model.precision, device).precision
    return Compute(precision, model.threads or 1, device.type)


def pinned(template: Request, compute: Compute) -> Request:
    """The template whose cases all run at this precision and thread count."""
    model = dataclasses.replace(template.model, precision=compute.precision, threads=compute.threads)
    return dataclasses.replace(template, model=model)


def ran_with(report: dict) -> dict | None:
    """The compute a case's report says ran (None for a method without a model)."""
    model = report.get("model", {})
    if not model.get("name"):
        return None
    return {"precision": model.get("precision"), "threads": model.get("threads"),
            "device": str(model.get("device", "")).split(":")[0]}


def other_precision(records: dict, compute: Compute) -> dict[str, str]:
    """case id -> precision, for done cases that ran in another precision than ``compute``."""
    return {case: r["compute"]["precision"] for case, r in records.items()
            if r.get("status") == "done" and (r.get("compute") or {}).get("precision") not in (None, compute.precision)}


def refuse_mixed_precision(cases: dict[str, str], compute: Compute, folder) -> None:
    """One line: which cases ran otherwise, and the three ways on."""
    old = sorted(set(cases.values()))
    raise InputError(f"{len(cases)} case(s) in {folder} ran in {'/'.join(old)} (e.g. {next(iter(cases))}), this run "
                     f"would run in {compute.precision}: add --precision {old[0]} to run as they did, --force to redo "
                     f"them in {compute.precision}, or --mixed-precision to keep them as they are")


def say_other_threads(records: dict, compute: Compute, folder, who: str = "this run") -> None:
    """One line when done cases ran with another thread count than ``compute`` (results may differ in
    the last bits from what they would be now)."""
    counts: dict[int, int] = {}
    for r in records.values():
        threads = (r.get("compute") or {}).get("threads") if r.get("status") == "done" else None
        if threads not in (None, compute.threads):
            counts[threads] = counts.get(threads, 0) + 1
    if counts:
        common = max(counts, key=counts.get)
        log.warning("%d case(s) in %s ran with %s torch thread(s) and %s uses %d: a case may differ from them in "
                    "the last bits (--threads %d runs as most of them did)", sum(counts.values()), folder,
                    "/".join(str(t) for t in sorted(counts)), who, compute.threads, common)
