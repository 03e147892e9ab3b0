"""Choosing the compute device and its precision."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..common.choices import PRECISIONS, RESERVED_CORES_ENV
from ..common.errors import InputError
from .models import REGISTRY, get_spec


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


def free_cores(reserved: int | None = None, sample_s: float = 0.1) -> int:
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


def set_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested``, else to the free cores; the count set."""
    count = int(requested) if requested else free_cores()
    torch.set_num_threads(count)
    return count


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast where ``precision`` is "bf16", full precision otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_autocast(predictor):
    """autocast at the precision the predictor was built with (build.build_video_predictor sets it)."""
    return autocast(predictor.device, predictor.precision)


def precision_tag(predictor) -> str:
    """":bf16" or ":fp32", for the keys of saved features (bfloat16 features must not be read back into
    a float32 run, nor the reverse)."""
    return f":{predictor.precision}"


# --- precision -------------------------------------------------------------------------------------------

# The x86 flags (Linux /proc/cpuinfo names) of a CPU that computes bfloat16 natively: AMX tiles or
# AVX512-BF16 dot products. Without them oneDNN emulates bfloat16 and a run is slower than float32.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


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


# The default precision of a site (or of a test run, which pins fp32): fp32, bf16 or auto.
PRECISION_ENV = "SAM2FEWSHOT_PRECISION"


class PrecisionChoice(NamedTuple):
    precision: str  # what runs: "fp32" or "bf16"
    reason: str  # why, in words, for the report
    warning: str | None = None  # bf16 asked for where it is only emulated


def choose_precision(requested: str | None, device_type: str, native: bool) -> str:
    """The precision a run uses: fp32 or bf16. Without a choice (None) or with ``auto``, bf16 where the
    device computes it natively, else fp32; CUDA runs bf16 by default whatever its generation (SAM2's
    own autocast). An explicit choice is kept."""
    requested = _checked(requested)
    if requested is None and device_type == "cuda":
        return "bf16"
    if requested in (None, "auto"):
        return "bf16" if native else "fp32"
    return requested


def resolve_precision(requested: str | None, device: torch.device) -> PrecisionChoice:
    """What runs on ``device`` for ``requested`` (None: $SAM2FEWSHOT_PRECISION, else the default), why,
    and a one-line warning when bf16 was asked for on a processor that only emulates it."""
    requested, source = _checked(requested), "asked for"
    if requested is None and os.environ.get(PRECISION_ENV):
        requested = _checked(os.environ[PRECISION_ENV], PRECISION_ENV)
        source = f"{PRECISION_ENV}={requested}"
    native = native_bf16(device)
    precision = choose_precision(requested, device.type, native)
    where = {"cuda": "CUDA GPU", "mps": "Apple GPU"}.get(device.type, "CPU")
    if requested in ("fp32", "bf16"):
        reason = source
    elif requested is None and device.type == "cuda":
        reason = "default: SAM2 runs in bfloat16 on CUDA"
    else:
        prefix = "default" if requested is None else ("auto" if source == "asked for" else source)
        reason = f"{prefix}: this {where} {'computes bfloat16 natively' if native else 'has no native bfloat16'}"
    warning = None
    if precision == "bf16" and not native and device.type != "cuda":
        warning = (f"bfloat16 was asked for, but this {where} has no native bfloat16 (AMX-BF16 or AVX512-BF16): "
                   "the run will be slower than float32")
    return PrecisionChoice(precision, reason, warning)


def default_precision(device: torch.device) -> str:
    """What runs on ``device`` when no precision is asked for."""
    return resolve_precision(None, device).precision


def _checked(value: str | None, source: str = "precision") -> str | None:
    value = (value or "").strip().lower() or None
    if value not in (None, *PRECISIONS):
        raise InputError(f"unknown {source} '{value}': use fp32, bf16 or auto")
    return value


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


def gpu_advice(model: str, free_bytes: int, names: Sequence[str] | None = None) -> str | None:
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


def gpu_advice_for(model: str, device: torch.device) -> str | None:
    """gpu_advice for a run on ``device``, measured where the model runs (the worker, never the
    Slicer process, which must not hold a CUDA context); None off CUDA."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return gpu_advice(model, int(free))
