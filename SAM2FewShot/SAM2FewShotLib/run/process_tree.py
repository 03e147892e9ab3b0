"""Stopping a worker with everything it started, with or without psutil.

psutil (installed with the SAM2 methods) finds the children by walking the process tree. A fresh 3D
Slicer does not ship it and the registration method must run there (issue 25), so the worker is also
started as the leader of a process group of its own (POSIX; a new process group on Windows): without
psutil the whole group is signalled (POSIX) or taskkill ends the tree (Windows).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def popen_options() -> dict:
    """subprocess.Popen arguments that make the started process the head of a tree we can stop as one."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def kill_tree(pid: int, grace: float = 0.3, timeout: float = 0.6) -> None:
    """Stop a process and all its descendants: asked to end first, killed when still alive after ``grace``."""
    try:
        import psutil
    except ImportError:
        _kill_group(pid, grace, timeout)
        return
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def _kill_group(pid: int, grace: float, timeout: float) -> None:
    """Without psutil: the process group ``pid`` leads (popen_options), or taskkill's tree on Windows."""
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True,
                       creationflags=subprocess.CREATE_NO_WINDOW, check=False)
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):  # the group is gone (a PermissionError on macOS)
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return
            time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
