"""First use in 3D Slicer: is this Slicer new enough, which Python packages are missing, installing them.

No Qt and no Slicer here (the module asks the user and runs pip); nothing is imported that may be
missing, so this runs in a fresh Slicer before torch exists. Slicer's Python is shared by every
extension: packages are asked for at the oldest version whose APIs we use (pyproject.toml pins
the project's own environment; a test keeps the two consistent), and a constraints file holds
every package already there (numpy, SimpleITK, other extensions' packages) at its version.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import Cancelled, InputError

TORCH_REQUIREMENT = ">=2.5.1"  # sam2 1.1.0 needs torch 2.5.1 or later
PIP_ENVIRONMENT = {"SAM2_BUILD_CUDA": "0"}  # sam2's optional CUDA extension is not needed


MINIMUM_SLICER = (5, 10)  # the first 3D Slicer with Python 3.12
MINIMUM_PYTHON = (3, 10)  # sam2 and huggingface_hub need it (Slicer 5.8 has 3.9)
_installing = threading.Lock()  # one install at a time, however often the user clicks


@dataclass(frozen=True)
class Requirement:
    distribution: str  # the pip name
    module: str  # the import name
    specifier: str  # pyproject.toml's pin, for the project's own environment: "==1.1.0"
    minimum: str  # the oldest version whose APIs we use: installed in Slicer as ">=minimum"
    no_deps: bool = False  # install without its dependencies (sam2 would pull torchvision)
    slicer_provides: bool = False  # part of Slicer itself: never installed or replaced
    exact: bool = False  # installed at the pin in Slicer too (sam2: our predictor subclasses its internals)

    @property
    def pip_argument(self) -> str:
        """What Slicer's pip is asked for: a minimum, so a newer version another extension installed stays."""
        return f"{self.distribution}{self.specifier if self.exact else '>=' + self.minimum}"


# Minimums: the oldest release with every API we (and sam2 1.1.0, installed without its dependencies)
# use, each checked against its changelog and by the test suite in an environment holding them.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("sam2", "sam2", "==1.1.0", "1.1.0", no_deps=True, exact=True),
    Requirement("huggingface_hub", "huggingface_hub", "==2.4.0", "1.1.0"),  # hf_hub_download(tqdm_class=)
    Requirement("hydra-core", "hydra", "==1.3.2", "1.3.2"),  # sam2's floor (1.2 does not import on 3.11+)
    Requirement("iopath", "iopath", "==0.1.10", "0.1.10"),  # sam2's floor
    Requirement("tqdm", "tqdm", "==4.70.1", "4.69.1"),  # older ones can fail when Ctrl-C hits a first draw
    Requirement("slicerio", "slicerio", "==1.4.0", "1.3.0"),  # slicerio.create_segmentation
    Requirement("pynrrd", "nrrd", "==1.1.3", "1.1.0"),  # 1.0 does not import under numpy 2
    Requirement("psutil", "psutil", "==7.2.2", "5.9.4"),  # the first with wheels for Python 3.12
    Requirement("pillow", "PIL", "==13.0.0", "9.4.0", slicer_provides=True),  # sam2's floor
    Requirement("SimpleITK", "SimpleITK", "==2.5.3", "2.4.0", slicer_provides=True),  # typed initializer transforms
    Requirement("numpy", "numpy", ">=1.26,<2.5", "1.24.4", slicer_provides=True),  # sam2's floor
)


def requirements_for(needs_model: bool) -> tuple[Requirement, ...]:
    """Everything for SAM2 methods; for the weight-free one (registration) only what Slicer itself ships,
    checked, never installed: its path (panel, worker, method, outputs) imports nothing else (issue 25,
    Testing/bare_slicer)."""
    return REQUIREMENTS if needs_model else tuple(r for r in REQUIREMENTS if r.slicer_provides)


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


def installed_version(requirement: Requirement) -> str | None:
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


def plan_install(versions: dict[str, str | None] | None = None,
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


def pip_commands(requirements: Sequence[Requirement], constraints: str | None = None) -> list[list[str]]:
    """pip install argument lists: --no-deps packages alone first, then the rest in one command,
    each with ``-c constraints`` when given. Slicer's own packages are never in them."""
    requirements = [r for r in requirements if not r.slicer_provides]
    keep = ["-c", str(constraints)] if constraints else []
    commands = [[r.pip_argument, "--no-deps", "--no-build-isolation", *keep] for r in requirements if r.no_deps]
    rest = [r.pip_argument for r in requirements if not r.no_deps]
    return commands + ([rest + keep] if rest else [])


def installed_distributions() -> dict[str, str]:
    """name -> version of every distribution in this Python (names as pip normalises them)."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
    return found


def constraints_text(installed: dict[str, str], installing: Sequence[Requirement]) -> str:
    """A pip constraints file keeping every package already in Slicer's Python at its version (numpy,
    SimpleITK, and what other extensions installed), except the ones being installed now: pip
    then only adds packages, and a requirement that would change a shared one fails instead."""
    ours = {re.sub(r"[-_.]+", "-", r.distribution).lower() for r in installing}
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items()) if name not in ours)


def host_problem(slicer_version: Sequence[int], python_version: Sequence[int]) -> str | None:
    """None on a 3D Slicer SAM2FewShot runs in, else one sentence saying why not (checked first,
    before anything is installed)."""
    if tuple(slicer_version[:2]) < MINIMUM_SLICER or tuple(python_version[:2]) < MINIMUM_PYTHON:
        need = ".".join(map(str, MINIMUM_SLICER))
        have = ".".join(map(str, slicer_version[:2]))
        python = ".".join(map(str, python_version[:2]))
        return (f"SAM2FewShot needs 3D Slicer {need} or later (this is {have}, with Python {python}): "
                f"install the current 3D Slicer from download.slicer.org.")
    return None


def torch_problem(version: str | None) -> str | None:
    """None when the installed torch will do, else what is wrong with it."""
    if version is None:
        return "PyTorch is not installed"
    minimum = TORCH_REQUIREMENT.lstrip(">=")
    if not at_least(version, minimum):
        return f"PyTorch {version} is too old: SAM2 needs {minimum} or later"
    return None


def torch_version() -> str | None:
    """The installed torch's version without importing it (None when it is missing)."""
    return installed_version(Requirement("torch", "torch", "", "0"))


def consent_text(plan: InstallPlan, torch_missing: str | None) -> str:
    """The question shown before anything is installed."""
    lines = ["SAM2FewShot needs Python packages that are not installed in this 3D Slicer:", ""]
    if torch_missing:
        lines.append(f"- PyTorch {TORCH_REQUIREMENT} through the PyTorch extension ({torch_missing})")
    lines += [f"- {r.pip_argument}" + (" (without its dependencies)" if r.no_deps else "") for r in plan.install]
    lines += ["", "Installing takes a few minutes and may need a restart of 3D Slicer. Install now?"]
    return "\n".join(lines)


def ensure_installed(needs_model: bool, confirm: Callable[[str], bool], pip_install: Callable[[list[str]], object],
                     install_torch: Callable[[str], None], log: Callable[[str], None] = print,
                     slicer_version: Sequence[int] = MINIMUM_SLICER,
                     python_version: Sequence[int] = tuple(sys.version_info[:2]),
                     on_start: Callable[[], None] = lambda: None) -> bool:
    """Install what is missing once ``confirm(question)`` agrees; False when the user declines.

    The host is checked first (an old Slicer is told so before anything is installed); one install
    at a time (InputError while another runs). ``pip_install`` and ``install_torch`` are the host's
    (in Slicer: slicer.util.pip_install and the PyTorch extension); nothing is installed without
    consent, at minimum versions, with every package already there held at its version. ``on_start`` is
    called after consent, inside the lock, before the first install: is_installing() is True there, so a
    panel that refreshes its states then shows itself locked for as long as pip runs.
    """
    problem = host_problem(slicer_version, python_version)
    if problem:
        raise InputError(problem)
    if not _installing.acquire(blocking=False):
        raise InputError("Python packages are being installed for SAM2FewShot: wait until that finishes")
    try:
        return _install(needs_model, confirm, pip_install, install_torch, log, on_start)
    finally:
        _installing.release()


def _install(needs_model, confirm, pip_install, install_torch, log, on_start) -> bool:
    plan = plan_install(requirements=requirements_for(needs_model))
    problem = torch_problem(torch_version()) if needs_model else None
    if plan.unfixable:
        raise InputError("; ".join(plan.unfixable))
    if not plan.install and not problem:
        return True
    if not confirm(consent_text(plan, problem)):
        return False
    on_start()
    if problem:
        install_torch(problem)
    os.environ.update(PIP_ENVIRONMENT)
    with tempfile.TemporaryDirectory(prefix="sam2fewshot-pip-") as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text(constraints_text(installed_distributions(), plan.install), encoding="utf-8")
        for arguments in pip_commands(plan.install, constraints):
            log("pip install " + " ".join(arguments))
            pip_install(arguments)
    importlib.invalidate_caches()
    return True


def is_installing() -> bool:
    """True while ensure_installed runs: the panel stays locked."""
    return _installing.locked()


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
        self.error: BaseException | None = None
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

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total > 0 else 0.0
