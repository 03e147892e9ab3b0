"""First use in 3D Slicer: which Python packages are missing, how to install them, GPU memory advice.

No Qt and no Slicer here (the module asks the user and runs pip); nothing is imported that may be
missing, so this runs in a fresh Slicer before torch exists. The pins are pyproject.toml's
(a test keeps them equal). Packages Slicer ships (numpy, SimpleITK, pillow) are used as they
are and never replaced: replacing them under a running Slicer breaks it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..common.errors import Cancelled, InputError
from ..sam2.registry import REGISTRY, get_spec

TORCH_REQUIREMENT = ">=2.5.1"  # sam2 1.1.0 needs torch 2.5.1 or later
PIP_ENVIRONMENT = {"SAM2_BUILD_CUDA": "0"}  # sam2's optional CUDA extension is not needed


@dataclass(frozen=True)
class Requirement:
    distribution: str  # the pip name
    module: str  # the import name
    specifier: str  # what gets installed: "==1.1.0" (pyproject.toml's pin)
    minimum: str  # an installed version at least this old is kept as it is
    no_deps: bool = False  # install without its dependencies (sam2 would pull torchvision)
    slicer_provides: bool = False  # part of Slicer itself: never installed or replaced

    @property
    def pip_argument(self) -> str:
        return f"{self.distribution}{self.specifier}"


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("sam2", "sam2", "==1.1.0", "1.1.0", no_deps=True),
    Requirement("huggingface_hub", "huggingface_hub", "==2.4.0", "2.4.0"),
    Requirement("hydra-core", "hydra", "==1.3.2", "1.3.2"),
    Requirement("iopath", "iopath", "==0.1.10", "0.1.10"),
    Requirement("tqdm", "tqdm", "==4.70.1", "4.66.1"),
    Requirement("slicerio", "slicerio", "==1.4.0", "1.4.0"),
    Requirement("pynrrd", "nrrd", "==1.1.3", "1.1.3"),
    Requirement("psutil", "psutil", "==7.2.2", "5.9.0"),
    Requirement("pillow", "PIL", "==13.0.0", "9.4.0", slicer_provides=True),
    Requirement("SimpleITK", "SimpleITK", "==2.5.3", "2.2.0", slicer_provides=True),
    Requirement("numpy", "numpy", ">=1.26,<2.5", "1.26.0", slicer_provides=True),
)


def requirements_for(needs_model: bool) -> tuple[Requirement, ...]:
    """Everything for SAM2 methods; without sam2 for the weight-free ones (registration)."""
    return REQUIREMENTS if needs_model else tuple(r for r in REQUIREMENTS if r.distribution != "sam2")


def version_tuple(version: str) -> tuple[int, ...]:
    """(2, 5, 1) for '2.5.1+cu121' or '2.5.1rc1': the leading release numbers only."""
    numbers = []
    for part in version.split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() < len(part):
            break
    return tuple(numbers)


def at_least(version: str, minimum: str) -> bool:
    """Release numbers compared with missing parts as zeros: '1.26' is at least '1.26.0'."""
    a, b = version_tuple(version), version_tuple(minimum)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def installed_version(requirement: Requirement) -> Optional[str]:
    """The installed version, or None when the module cannot be imported from this Python."""
    if importlib.util.find_spec(requirement.module) is None:
        return None
    try:
        return importlib.metadata.version(requirement.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "0"  # importable but without metadata (a source checkout): trust it


@dataclass(frozen=True)
class InstallPlan:
    install: tuple[Requirement, ...]  # to pip install, at their pins
    unfixable: tuple[str, ...]  # problems with Slicer's own packages: reinstalling Slicer fixes them

    @property
    def needed(self) -> bool:
        return bool(self.install or self.unfixable)


def plan_install(versions: Optional[dict[str, Optional[str]]] = None,
                 requirements: Sequence[Requirement] = REQUIREMENTS) -> InstallPlan:
    """What to install, given installed versions by distribution (None: missing; default: look)."""
    install, unfixable = [], []
    for req in requirements:
        version = versions.get(req.distribution) if versions is not None else installed_version(req)
        if version is not None and at_least(version, req.minimum):
            continue
        if req.slicer_provides:
            found = "missing" if version is None else f"version {version}, older than {req.minimum}"
            unfixable.append(f"{req.distribution} ({found}) comes with 3D Slicer: reinstall Slicer")
        else:
            install.append(req)
    return InstallPlan(tuple(install), tuple(unfixable))


def pip_commands(requirements: Sequence[Requirement]) -> list[list[str]]:
    """pip install argument lists: --no-deps packages alone first, then the rest in one command.

    Slicer's own packages are never in them.
    """
    requirements = [r for r in requirements if not r.slicer_provides]
    commands = [[r.pip_argument, "--no-deps", "--no-build-isolation"] for r in requirements if r.no_deps]
    rest = [r.pip_argument for r in requirements if not r.no_deps]
    return commands + ([rest] if rest else [])


def torch_problem(version: Optional[str]) -> Optional[str]:
    """None when the installed torch will do, else what is wrong with it."""
    if version is None:
        return "PyTorch is not installed"
    minimum = TORCH_REQUIREMENT.lstrip(">=")
    if not at_least(version, minimum):
        return f"PyTorch {version} is too old: SAM2 needs {minimum} or later"
    return None


def torch_version() -> Optional[str]:
    """The installed torch's version without importing it (None when it is missing)."""
    return installed_version(Requirement("torch", "torch", "", "0"))


def consent_text(plan: InstallPlan, torch_missing: Optional[str]) -> str:
    """The question shown before anything is installed."""
    lines = ["SAM2FewShot needs Python packages that are not installed in this 3D Slicer:", ""]
    if torch_missing:
        lines.append(f"- PyTorch {TORCH_REQUIREMENT} through the PyTorch extension ({torch_missing})")
    lines += [f"- {r.pip_argument}" + (" (without its dependencies)" if r.no_deps else "") for r in plan.install]
    lines += ["", "Installing takes a few minutes and may need a restart of 3D Slicer. Install now?"]
    return "\n".join(lines)


def ensure_installed(needs_model: bool, confirm: Callable[[str], bool], pip_install: Callable[[list[str]], object],
                     install_torch: Callable[[str], None], log: Callable[[str], None] = print) -> bool:
    """Install what is missing once ``confirm(question)`` agrees; False when the user declines.

    ``pip_install`` and ``install_torch`` are the host's (in Slicer: slicer.util.pip_install and
    the PyTorch extension); nothing is installed without consent, and Slicer's own packages never.
    """
    plan = plan_install(requirements=requirements_for(needs_model))
    problem = torch_problem(torch_version()) if needs_model else None
    if plan.unfixable:
        raise InputError("; ".join(plan.unfixable))
    if not plan.install and not problem:
        return True
    if not confirm(consent_text(plan, problem)):
        return False
    if problem:
        install_torch(problem)
    os.environ.update(PIP_ENVIRONMENT)
    for arguments in pip_commands(plan.install):
        log("pip install " + " ".join(arguments))
        pip_install(arguments)
    importlib.invalidate_caches()
    return True


# --- GPU memory -----------------------------------------------------------------------------------

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


def gpu_advice_for(model: str, device: str) -> Optional[str]:
    """gpu_advice for a run on ``device``; None off CUDA (the CPU and MPS are not checked)."""
    free = cuda_free_bytes() if device in ("auto", "cuda") else None
    return None if free is None else gpu_advice(model, free)


def cuda_free_bytes() -> Optional[int]:
    """Free memory of the current CUDA device, or None without CUDA (torch imported only here)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


# --- model download in the background ----------------------------------------------------------


class BackgroundDownload:
    """weights.download in a thread, so a dialog can show its progress from a timer and cancel it.

    The panel polls ``finished``, ``fraction`` and ``error``; ``cancel()`` makes the next progress
    callback raise, which aborts the transfer (the cache never holds a partial file under the
    final name: the hub downloads to a temporary name and the checksum is checked after).
    """

    def __init__(self, name: str, offline: bool = False):
        self.name = name
        self.done = 0
        self.total = 0
        self.error: Optional[BaseException] = None
        self.path = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(offline,), daemon=True)
        self._thread.start()

    def _progress(self, stage: str, done: int, total: int) -> None:
        if self._cancelled.is_set():
            raise Cancelled(f"download of {self.name} cancelled")
        self.done, self.total = int(done), int(total)

    def _run(self, offline: bool) -> None:
        from ..sam2.weights import download

        try:
            self.path = download(self.name, offline=offline, progress=self._progress)
        except BaseException as exc:  # noqa: BLE001 - handed to the panel, which shows one message
            self.error = Cancelled(f"download of {self.name} cancelled") if self._cancelled.is_set() else exc

    def cancel(self) -> None:
        self._cancelled.set()

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total > 0 else 0.0
