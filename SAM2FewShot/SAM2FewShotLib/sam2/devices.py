"""Choosing the compute device and its precision."""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch

from ..common.choices import RESERVED_CORES_ENV
from ..common.errors import InputError
from .registry import REGISTRY, get_spec


def resolve_device(name: str = "auto") -> torch.device:
    """auto: CUDA when present, then Apple MPS, else the CPU."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("device cuda was asked for, but this PyTorch has no usable CUDA GPU")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError("device mps was asked for, but it is not available here")
        # A few sam2 ops have no MPS kernel; let PyTorch fall back to the CPU for those.
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device '{name}': use auto, cuda, mps or cpu")


def choose_threads(cpus: int, busy: float, reserved: int = 0) -> int:
    """Threads for torch: the cores not busy with other programs' work, minus the reserved ones; at
    least 1. Torch's default (every core) makes its threads wait for each other on a machine where
    another process is busy (issue 16: a run took 108 s that way and 23.7 s with one thread)."""
    return max(1, min(cpus, cpus - int(round(max(busy, 0.0)))) - max(reserved, 0))


def free_cores(reserved: Optional[int] = None, sample_s: float = 0.1) -> int:
    """choose_threads for this machine now: the cores this process may run on, and how many of them
    other processes keep busy (system CPU use over ``sample_s`` seconds minus this process's own)."""
    import psutil

    if reserved is None:
        reserved = int(os.environ.get(RESERVED_CORES_ENV, "0") or 0)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    me = psutil.Process()
    me.cpu_percent(None)
    total = psutil.cpu_percent(interval=sample_s) / 100.0 * (psutil.cpu_count() or cpus)
    ours = me.cpu_percent(None) / 100.0
    return choose_threads(cpus, total - ours, reserved)


def set_threads(requested: Optional[int] = None) -> int:
    """Set torch's intra-op threads to ``requested``, else to the free cores; the count set."""
    count = int(requested) if requested else free_cores()
    torch.set_num_threads(count)
    return count


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA (as SAM2 is meant to run); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- GPU memory advice -----------------------------------------------------------------------------------

# Rough free GPU memory (GiB) a run needs at the model's own image size: weights, activations of
# one batch of 4 slices, SAM2's memory bank and the engine's 2 GiB encoder-feature cache. Guidance
# for the warning only (not measured on these machines, which have no GPU): a run that does not
# fit fails with a clear out-of-memory message and leaves the scene as it was.
GPU_GIB_NEEDED = {"tiny": 4.0, "small": 4.5, "base-plus": 6.0, "large": 8.0}
MEDSAM2_GIB = 3.5


def gpu_gib_needed(model: str) -> float:
    spec = get_spec(model)
    if spec.family == "MedSAM2":
        return MEDSAM2_GIB
    return GPU_GIB_NEEDED[spec.name.split("-", 1)[1]]  # sam2.1-base-plus -> base-plus


def gpu_advice(model: str, free_bytes: int, names: Optional[Sequence[str]] = None) -> Optional[str]:
    """None when ``model`` fits in the free GPU memory, else a suggestion: a smaller model or the CPU."""
    free = free_bytes / 2 ** 30
    if gpu_gib_needed(model) <= free:
        return None
    fitting = [n for n in (names or list(REGISTRY)) if gpu_gib_needed(n) <= free
               and get_spec(n).family == get_spec(model).family]
    fitting.sort(key=gpu_gib_needed)
    need = gpu_gib_needed(model)
    text = f"{model} needs about {need:.1f} GiB of free GPU memory, and {free:.1f} GiB is free."
    if fitting:
        return f"{text} Use the smaller model {fitting[-1]}, or the CPU."
    return f"{text} Close other GPU programs, or run on the CPU (slower)."


def gpu_advice_for(model: str, device: torch.device) -> Optional[str]:
    """gpu_advice for a run on ``device``, measured where the model runs (the worker, never the
    Slicer process, which must not hold a CUDA context); None off CUDA."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return gpu_advice(model, int(free))
