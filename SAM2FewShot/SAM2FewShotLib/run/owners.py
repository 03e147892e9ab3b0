"""Which process owns something, told by its PID *and* its start time, and whether that process still runs.

A PID alone lies: once a process is gone the system hands its number to a later one, so "PID 4242 is alive"
says nothing about the Slicer that wrote 4242 into a job folder yesterday. A record of the PID, the process
start time and the host is checked against the running process instead. Used by the job folders (a crashed
Slicer's are swept, another running Slicer's kept) and by the worker (it exits when Slicer is gone).
psutil is used when installed; without it Linux is read from /proc (the same numbers psutil gives) and
elsewhere a liveness question gets "cannot tell" (None), which every caller treats as "keep".
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable

# Start times are floats computed from the boot time, which Linux reports to the second and may jitter by one:
# a later process reusing the PID starts far more than this after the owner did (the PID space must wrap).
START_TOLERANCE_S = 1.0
# The client's record for the worker: the process to watch (Slicer's, not that of the PythonSlicer launcher
# between them, which outlives a Slicer crash).
PARENT_ENV = "SAM2FEWSHOT_PARENT"


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch); None when no live process has this PID (a
    zombie counts as gone). OSError when this system cannot tell (no psutil off Linux, access denied)."""
    try:
        import psutil
    except ImportError:
        return _proc_start_time(pid)
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.NoSuchProcess:  # ZombieProcess included
        return None
    except psutil.AccessDenied as exc:
        raise PermissionError(f"cannot read process {pid}") from exc


def _proc_start_time(pid: int) -> float | None:
    """psutil's create_time on Linux, read from /proc: boot time + start ticks / clock ticks per second."""
    if not os.path.isdir("/proc/self"):
        raise OSError("without psutil the start time of a process is known on Linux only")
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    with open("/proc/stat", encoding="ascii") as system:
        boot = next(float(line.split()[1]) for line in system if line.startswith("btime"))
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def same_process(pid: int, started: float | None) -> bool | None:
    """True while the process that started at ``started`` still runs under ``pid``; False when it is gone or
    its PID belongs to a process started at another time; None when this system cannot tell. Without a
    recorded start time, any live process with that PID counts."""
    try:
        now = process_start_time(pid)
    except OSError:
        return None
    if now is None:
        return False
    return started is None or abs(now - started) <= START_TOLERANCE_S


_OWN: dict[int, dict] = {}  # this process's record, by PID (a fork gets its own)


def owner_record(pid: int | None = None) -> dict:
    """{"pid", "started", "host"} of a process (this one by default); started is None where it cannot be read."""
    pid = os.getpid() if pid is None else pid
    if pid in _OWN:
        return dict(_OWN[pid])
    try:
        started = process_start_time(pid)
    except OSError:
        started = None
    record = {"pid": pid, "started": started, "host": socket.gethostname()}
    if pid == os.getpid():
        _OWN[pid] = record
    return dict(record)


def owner_alive(record: object) -> bool | None:
    """Whether the process a record names still runs: True, False, or None when it cannot be told (a record
    that is not one, another host's process, a system without the means)."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return None
    pid, started = record.get("pid"), record.get("started")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if started is not None and not isinstance(started, (int, float)):
        return None
    return same_process(pid, started)


def parent_record(environ: dict | None = None) -> dict:
    """The process a worker watches: the record its client passed in PARENT_ENV, else its parent process."""
    text = (os.environ if environ is None else environ).get(PARENT_ENV, "")
    try:
        record = json.loads(text) if text else None
    except ValueError:
        record = None
    if isinstance(record, dict) and owner_alive(record) is not None:
        return record
    return owner_record(os.getppid())


def watch(record: dict, on_gone: Callable[[], None], interval: float = 1.0) -> threading.Thread:
    """A daemon thread calling ``on_gone()`` once the process of ``record`` is gone (checked every ``interval``
    seconds). When it is this process's parent, a change of parent (POSIX reparents the orphans at once)
    counts too: no PID lookup can be fooled by that."""
    direct = os.name == "posix" and record["pid"] == os.getppid()

    def gone() -> bool:
        return (direct and os.getppid() != record["pid"]) or owner_alive(record) is False

    def run() -> None:
        while not gone():
            time.sleep(interval)
        on_gone()

    thread = threading.Thread(target=run, name="sam2fewshot-parent-watch", daemon=True)
    thread.start()
    return thread
