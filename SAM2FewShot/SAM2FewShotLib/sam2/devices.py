"""Choosing the compute device and its precision."""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch

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
