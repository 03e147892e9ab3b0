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


def autocast(device: torch.device, precision: Optional[str] = None):
    """bfloat16 autocast where ``precision`` is "bf16"; without one, the device's default
    (default_precision): bfloat16 on CUDA, as SAM2 is meant to run, full precision elsewhere."""
    if (precision or default_precision(device)) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_autocast(predictor):
    """autocast at the precision the predictor was loaded with (build.load_model sets it)."""
    return autocast(predictor.device, getattr(predictor, "precision", None))


def precision_tag(predictor) -> str:
    """"" for a predictor at its device's default precision, else ":bf16" / ":fp32": for the keys of
    saved features (bfloat16 features must not be read back into a float32 run, nor the reverse)."""
    precision = getattr(predictor, "precision", None)
    return "" if precision in (None, default_precision(predictor.device)) else f":{precision}"


# --- precision -------------------------------------------------------------------------------------------

# The x86 flags (Linux /proc/cpuinfo names) of a CPU that computes bfloat16 natively: AMX tiles or
# AVX512-BF16 dot products. Without them oneDNN emulates bfloat16 and a run is slower than float32.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def default_precision(device: torch.device) -> str:
    """What runs when no precision is asked for: bf16 on CUDA (unchanged), fp32 on the CPU and MPS."""
    return "bf16" if device.type == "cuda" else "fp32"


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether a Linux /proc/cpuinfo text lists a native bfloat16 flag."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and set(line.split(":", 1)[-1].split()) & set(CPU_BF16_FLAGS):
            return True
    return False


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16 (x86, as torch's cpuinfo or Linux reports it), or Arm FEAT_BF16 (macOS)."""
    import platform
    import subprocess

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        if any(probe() for probe in probes if probe is not None):
            return True
    except RuntimeError:  # a torch build without cpuinfo: read the flags ourselves
        pass
    if platform.system() == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                return cpuinfo_has_bf16(f.read())
        except OSError:
            return False
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.stdout.strip() == "1"
    return False


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (so bf16 is faster there, not emulated)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        newer = getattr(mps, "is_macos_or_newer", None)
        return bool(newer and newer(14, 0)) and cpu_has_native_bf16()  # Metal bfloat16: macOS 14, Apple M2+
    return cpu_has_native_bf16()


def choose_precision(requested: Optional[str], device_type: str, native: bool) -> str:
    """The precision a run uses: fp32 or bf16. ``auto`` picks bf16 only where it is native; None keeps
    the device's default (bf16 on CUDA, fp32 elsewhere); an explicit choice is kept."""
    requested = (requested or "").lower() or None
    if requested not in (None, "fp32", "bf16", "auto"):
        raise InputError(f"unknown precision '{requested}': use fp32, bf16 or auto")
    if requested is None:
        return default_precision(torch.device(device_type))
    if requested == "auto":
        return "bf16" if native else "fp32"
    return requested


def resolve_precision(requested: Optional[str], device: torch.device) -> tuple[str, Optional[str]]:
    """(precision, warning): what runs on ``device``, and a one-line warning when bf16 was asked for
    on a processor that only emulates it."""
    default_or_auto = requested in (None, "auto")
    native = native_bf16(device) if requested is not None else False
    precision = choose_precision(requested, device.type, native)
    if precision == "bf16" and not native and not default_or_auto:
        return precision, (f"bfloat16 was asked for, but this {device.type.upper()} has no native bfloat16 "
                           "(AMX-BF16 or AVX512-BF16): the run will be slower than float32")
    return precision, None


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
