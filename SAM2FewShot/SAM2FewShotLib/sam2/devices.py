"""Choosing the compute device and its precision."""

from __future__ import annotations

import contextlib
import os

import torch

from ..common.errors import InputError


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
