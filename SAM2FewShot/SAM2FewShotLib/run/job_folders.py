"""Who owns a job folder, and the sweep that removes the folders a crashed Slicer left behind.

A job folder holds a copy of the query (half a gigabyte for a big CT) and is removed when its run ends; a
Slicer that crashes mid-run leaves it in the temp folder for good. Each folder therefore records its owner
(PID, process start time, host: see owners.py), and the sweep at module start removes a folder only when
that owner is gone, so the folders of another Slicer still running, even of another version, are never
touched. The rules, in order:

- not a folder named ``sam2fewshot-job-*`` of this user (a link, a file, another user's): never touched;
- an owner record naming a process of this host: removed when that process is gone or its PID now belongs
  to a process started at another time, kept while it runs;
- no readable record, another host's, or no way to tell here: kept while younger than a day (a folder
  being made has no record for a moment; older versions wrote none), removed when older (no run lasts a
  day). The age is the folder's last change (its modification time).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

from .owners import owner_alive, owner_record

PREFIX = "sam2fewshot-job-"
OWNER_FILE = "owner.json"
UNKNOWN_OWNER_MAX_AGE_S = 24 * 3600

log = logging.getLogger(__name__)
_swept = threading.Lock()  # held for good once this process has started its sweep


def write_owner(folder: Path) -> None:
    """Record this process as the folder's owner (see the module's rules)."""
    (Path(folder) / OWNER_FILE).write_text(json.dumps(owner_record()), encoding="utf-8")


def read_owner(folder: Path) -> dict | None:
    """The folder's owner record; None when it has none or it cannot be read as one."""
    try:
        record = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_stale(folder: Path, now: float | None = None) -> bool:
    """Whether the sweep removes this job folder: its owner is gone, or it has no owner this host can check
    and is older than UNKNOWN_OWNER_MAX_AGE_S."""
    alive = owner_alive(read_owner(folder))
    if alive is not None:
        return not alive
    try:
        changed = os.stat(folder).st_mtime
    except OSError:
        return False
    return (time.time() if now is None else now) - changed > UNKNOWN_OWNER_MAX_AGE_S


def _is_ours(path: Path) -> bool:
    """A real folder (not a link) of this user: nothing else is ours to remove."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and (not hasattr(os, "getuid") or info.st_uid == os.getuid())


def sweep_stale_job_folders(root: str | Path | None = None) -> list[Path]:
    """Remove the job folders in ``root`` (the system temp folder by default) whose owner is gone; the ones
    removed. Never raises: a folder that cannot be read or removed is left for the next sweep."""
    root = Path(tempfile.gettempdir() if root is None else root)
    removed = []
    try:
        candidates = sorted(root.glob(PREFIX + "*"))
    except OSError:
        return removed
    for folder in candidates:
        if not _is_ours(folder) or not is_stale(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            removed.append(folder)
    if removed:
        log.info("Removed %d job folder(s) left by a Slicer that is gone", len(removed))
    return removed


def sweep_in_background(*roots: str | Path | None) -> threading.Thread | None:
    """Start the sweep of ``roots`` (the system temp folder when none) on a daemon thread, once per process
    (the Logic calls it as the module starts): the GUI never waits for gigabytes to be deleted. None when
    this process already swept."""
    if not _swept.acquire(blocking=False):
        return None

    def sweep() -> None:
        for root in roots or (None,):
            sweep_stale_job_folders(root)

    thread = threading.Thread(target=sweep, name="sam2fewshot-job-sweep", daemon=True)
    thread.start()
    return thread
