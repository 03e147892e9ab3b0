"""Why a worker died, in words a user can act on. Imports nothing heavy.

An out-of-memory kill is the usual way a big run dies: the kernel's OOM killer sends SIGKILL. Started
directly, the worker then ends with -9 (137 when a shell stands between). In Slicer, ``PythonSlicer`` is
CTK's launcher for ``python-real``: the launcher reaps its child itself and, for any death by a signal
(QProcess::CrashExit), only writes ``error: [<path>/python-real] exit abnormally - Report the problem.``
and exits 1 (commontk/AppLauncher, Base/ctkAppLauncher.cpp, applicationFinished), so which signal it
was is lost. There, the system's count of OOM kills (/proc/vmstat ``oom_kill``, Linux) tells whether
memory was the cause; without it (other systems) a crash of the launcher's child is still most often
memory, so the message names memory as the likely cause, with the engine's advice.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path

from . import protocol
from .worker import OOM_ADVICE

SIGKILL = getattr(signal, "SIGKILL", 9)
KILLED_CODES = (-SIGKILL, 128 + SIGKILL)  # Popen's code for a SIGKILL, and a shell's
LAUNCHER_CRASH = "exit abnormally - Report the problem."  # ctkAppLauncher's line for a child killed by a signal
ADVICE = OOM_ADVICE.removeprefix("out of memory: ")
VMSTAT = Path("/proc/vmstat")


def oom_kill_count(vmstat: Path = VMSTAT) -> int | None:
    """How many processes the kernel's OOM killer has killed since boot (Linux 4.13+); None elsewhere."""
    try:
        for line in vmstat.read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def oom_killed_since(count_at_start: int | None, vmstat: Path = VMSTAT) -> bool:
    """True when the OOM killer killed some process since ``count_at_start`` was read."""
    now = oom_kill_count(vmstat)
    return count_at_start is not None and now is not None and now > count_at_start


def last_line(stderr_tail: Sequence[str]) -> str:
    return next((line.strip() for line in reversed(stderr_tail) if line.strip()), "")


def describe_death(code: int | None, stderr_tail: Sequence[str], oom_killed: bool = False) -> str:
    """One sentence (it follows "Segmentation failed: ") for an unexpected worker death: memory named when
    the evidence points to it (a SIGKILL, the launcher's crash line, or a rise in the OOM-kill count), else
    the exit code and the worker's last words. ``code`` None: its output closed but it has not exited."""
    last = last_line(stderr_tail)
    if oom_killed or code in KILLED_CODES:
        how = "" if oom_killed else f" (the worker was killed by signal {SIGKILL}, as the out-of-memory killer does)"
        return f"the computation ran out of memory and was stopped by the system{how}: {ADVICE}."
    if LAUNCHER_CRASH in last:
        return ("the computation was stopped abruptly by the system, most likely because it ran out of memory: "
                f"{ADVICE}.")
    if code is None:
        return "the worker stopped unexpectedly (its output closed)."
    what = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    tail = f"; last message: {protocol.single_line(last, 300)}" if last else ""
    return f"the worker stopped unexpectedly ({what}{tail})."
