"""One writer per cohort folder: a lock file that works on the shared storage a Ray cluster writes to.

``flock`` is unreliable on network file systems, so the lock is a file created exclusively, holding
the holder's host, PID, process start time and a heartbeat it refreshes every ``HEARTBEAT_S``. It
appears complete: its record is written to a temporary file first, then hard-linked into place
(atomic, and refused when a lock exists, on NFS too), so a reader never takes a lock being written
for an abandoned one. A
holder on this host that is gone (or whose PID now belongs to another process) is taken over at
once; a holder on another host once its heartbeat is older than ``STALE_S`` (hosts' clocks are
assumed to agree within a minute, as NTP keeps them). Ray actors write under the driver's lock;
anything else that writes into the folder (review records) takes the same lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from ..common.errors import InputError
from ..common.files import replacing
from ..run.owners import process_start_time

HEARTBEAT_S = 15.0
STALE_S = 120.0
BEING_WRITTEN_S = 10.0  # an unreadable lock younger than this is a holder still writing it (no hard links)
UNKNOWN = -1.0  # a process that exists but whose start time may not be read: taken as the holder


class FolderLock:
    """``with FolderLock(folder, LOCK):`` holds the folder for the block, or refuses in one line."""

    def __init__(self, folder: Path, name: str, what: str = "a batch run"):
        self.path = Path(folder) / name
        self.what = what
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_folder = False

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise InputError naming the live holder."""
        self._made_folder = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot make the folder {self.path.parent}: {exc.strerror or exc}") from None
        takeovers, waited_until = 0, time.monotonic() + BEING_WRITTEN_S
        while not self._create():  # a holder may release, or a stale lock be taken by another, meanwhile
            holder = read_holder(self.path)
            if holder is None and _age(self.path) < BEING_WRITTEN_S and time.monotonic() < waited_until:
                time.sleep(0.2)  # made with O_EXCL where hard links are not supported: still being written
                continue
            if holder is not None and not is_stale(holder):
                raise InputError(f"{self.path.parent} is in use by {holder_words(holder)} (lock {self.path}): "
                                 "wait for it to end, or give another output folder")
            if takeovers == 3:
                raise InputError(f"cannot take the lock {self.path}: other processes keep taking it")
            takeovers += 1
            self._take_over()
            if self.held():
                break
        self._thread = threading.Thread(target=self._beat, name="sam2fewshot-lock", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        holder = read_holder(self.path)
        return holder is not None and holder.get("token") == self.token

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held():
            self.path.unlink(missing_ok=True)
        if self._made_folder:  # a run refused before writing anything leaves no empty folder
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid()),
                "heartbeat": time.time(), "token": self.token, "holder": self.what}

    def _create(self) -> bool:
        """Make the lock with its record in it, or False when one exists."""
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        try:
            tmp.write_text(json.dumps(self._record()), encoding="utf-8")
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: exclusive create, record written after
                return self._create_exclusive()
        except OSError as exc:  # a read-only folder, a full disk: one line, not a traceback
            raise InputError(f"cannot write into {self.path.parent}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._record(), f)
        return True

    def _take_over(self) -> None:
        """Replace a stale (or unreadable) lock, then re-read it: of two takers, the last write wins and
        the other sees a token not its own."""
        self._write()
        time.sleep(0.05)

    def _write(self) -> None:
        with replacing(self.path) as tmp:
            tmp.write_text(json.dumps(self._record()), encoding="utf-8")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self.held():
                self._write()


def read_holder(path: Path) -> dict | None:
    """The lock's record, or None when it is gone or unreadable (a half-written lock is stale)."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _age(path: Path) -> float:
    """Seconds since ``path`` was last written; infinite when it is gone."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def is_stale(holder: dict) -> bool:
    """A holder on this host whose process is gone; on another host, one silent for STALE_S."""
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return True
        started = process_start(pid)
        return started is None or (started != UNKNOWN and started != holder.get("started"))
    heartbeat = holder.get("heartbeat")
    return not isinstance(heartbeat, (int, float)) or time.time() - heartbeat > STALE_S


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (tells a reused PID from the holder), None when there is none (or
    only its zombie), UNKNOWN when it exists but may not be inspected (or this system cannot tell)."""
    if pid <= 0:
        return None
    try:
        started = process_start_time(pid)
    except OSError:  # access denied, or no psutil off Linux
        return UNKNOWN
    return None if started is None else round(started, 2)


def holder_words(holder: dict) -> str:
    since = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"{holder.get('holder', 'another run')} on host {holder.get('host')}, PID {holder.get('pid')}{when}"
