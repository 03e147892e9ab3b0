"""The volumes the panel hands to the worker: written once per volume into the cache, off the GUI thread.

An Apply used to write the query uncompressed into the system temp folder, on the GUI thread, for every
run (0.5 GB for a 512x512x1000 CT). Now each volume is written once, named by a digest of its voxels and
geometry, into a folder of this Slicer process in the cache (``cache_dir()/jobs``, the folder the
panel's settings choose), after a check that the disk has room; the next Apply on the same volume finds
its file and writes nothing. The folder records its owner like a job folder (run/job_folders.py): it is
removed when the scene closes or the module stops, and a crashed Slicer's is swept at the next start.

One store serves the panel's runs and the SAM2 effect's live session (the RunController's ``volumes``), so
a volume both use is written once. Each keeps files under a name of its own (a *user*): the panel its last
KEEP volumes, a live session its one until it ends (``release``). A file goes when no user keeps it. No Qt.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..common.cache import cache_dir
from ..common.errors import InputError
from ..io.volume import Volume

KEEP = 3  # volumes a user keeps: a query, its support, and the one before (Apply on another volume and back)
RUNS = "runs"  # the panel's runs, the store's default user
FREE_MARGIN_BYTES = 512 * 2 ** 20  # left free beyond the file itself: the disk is the user's too
JOBS_FOLDER = "jobs"


def jobs_root() -> Path:
    """Where the panel's long-lived job files go: in the cache, which the user chose and can move."""
    return cache_dir() / JOBS_FOLDER


def volume_key(volume: Volume) -> str:
    """A digest of the voxels, their type and the geometry: the same volume gives the same file."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((volume.array.shape, volume.array.dtype.str, volume.spacing, volume.origin,
                        volume.direction)).encode())
    digest.update(memoryview(np.ascontiguousarray(volume.array)).cast("B"))
    return digest.hexdigest()


def grid_of(volume: Volume) -> Volume:
    """The volume's grid (shape, type, geometry) without its voxels: a read-only view of one zero, which
    costs no memory however large the volume. What a run keeps once its files are written."""
    return volume.with_array(np.broadcast_to(np.zeros((), dtype=volume.array.dtype), volume.array.shape))


def require_free_space(folder: Path, needed: int) -> None:
    """InputError in one sentence when ``folder``'s disk cannot take ``needed`` bytes and the margin."""
    free = shutil.disk_usage(folder).free
    if free < needed + FREE_MARGIN_BYTES:
        raise InputError(
            f"not enough free disk space for the volume's working copy: {needed / 2 ** 30:.1f} GB needed, "
            f"{free / 2 ** 30:.1f} GB free in {folder}; free some space or choose another cache folder in "
            "the module's settings")


class VolumeStore:
    """This process's volume files, created on first use. Thread-safe: runs prepare files on a thread."""

    def __init__(self, root: Callable[[], Path] = jobs_root, keep: int = KEEP):
        self._root, self.keep = root, keep
        self._folder = None  # run.client.JobFolder
        self._kept: dict[str, list[Path]] = {}  # user -> its files, the most recently used first
        self._writing: dict[Path, int] = {}  # files being written (by how many threads): nobody keeps them yet
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path | None:
        return None if self._folder is None else self._folder.path

    def file_for(self, volume: Volume, user: str = RUNS) -> Path:
        """The volume's file, written now unless a run or a session wrote it (call it off the GUI thread);
        ``user`` keeps it (its last ``keep`` files) until it releases it or the store is cleared."""
        key = volume_key(volume)
        with self._lock:
            folder = self._open()
            path = folder / f"{key}.nrrd"
            if path.is_file():
                self._keep(user, path)
                return path
            require_free_space(folder, volume.array.nbytes)
            self._writing[path] = self._writing.get(path, 0) + 1
        from ..io.volume_io import write_volume

        try:
            write_volume(volume, path, compress=False)  # atomic: a half-written file never has the final name
        finally:
            with self._lock:
                self._writing[path] -= 1
                if not self._writing[path]:
                    del self._writing[path]
        with self._lock:
            if self._folder is not None and path.parent == self._folder.path:  # not cleared meanwhile
                self._keep(user, path)
            else:
                path.unlink(missing_ok=True)
        return path

    def kept(self, user: str = RUNS) -> list[Path]:
        """The files ``user`` keeps, the most recently used first."""
        with self._lock:
            return list(self._kept.get(user, ()))

    def release(self, user: str) -> None:
        """``user`` needs its files no more (a live session ended): those no other user keeps are removed."""
        with self._lock:
            self._kept.pop(user, None)
            self._remove_unkept()

    def clear(self) -> None:
        """Remove every file (scene closed, module stopped): a volume is never kept beyond its scene."""
        with self._lock:
            self._kept.clear()
            if self._folder is not None:
                self._folder.remove()
                self._folder = None

    def _open(self) -> Path:
        if self._folder is None or not self._folder.path.is_dir():
            from ..run.client import JobFolder

            root = self._root()
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"cannot write into the cache folder {root} ({exc.strerror or exc}): choose "
                                 "another cache folder in the module's settings") from exc
            self._folder, self._kept = JobFolder(root), {}
        return self._folder.path

    def _keep(self, user: str, path: Path) -> None:
        files = [path] + [f for f in self._kept.get(user, ()) if f != path]
        self._kept[user] = files[:max(self.keep, 1)]
        self._remove_unkept()

    def _remove_unkept(self) -> None:
        if self._folder is None:
            return
        kept = {f for files in self._kept.values() for f in files} | set(self._writing)
        for old in self._folder.path.glob("*.nrrd"):
            if old not in kept:
                old.unlink(missing_ok=True)


class Preparation:
    """A run's files written on a daemon thread; the GUI polls ``done()`` and then takes ``outcome()``.

    A failure becomes one sentence (InputError's own, or the OS's reason): the run ends with it and
    nothing reaches the worker or the scene. A cancelled run's preparation is dropped: it finishes its
    files (the volume's is kept for the next run) and nothing is sent.
    """

    def __init__(self, work: Callable[[], object]):
        self._value, self._problem = None, None
        self._lock, self._finished, self._cleanup = threading.Lock(), False, None
        self._thread = threading.Thread(target=self._run, args=(work,), name="sam2fewshot-run-files", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], object]) -> None:
        try:
            self._value = work()
        except InputError as exc:
            self._problem = str(exc)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            self._problem = f"its files could not be written{where}: {exc.strerror or exc}"
        except Exception as exc:  # noqa: BLE001 - reported as the run's end, never lost on a thread
            self._problem = f"its files could not be written: {exc}"
        with self._lock:
            self._finished, cleanup = True, self._cleanup
        if cleanup is not None:
            cleanup()

    def drop(self, cleanup: Callable[[], None]) -> None:
        """The run ended before its files were written: ``cleanup`` (removing its folder) runs once the
        writing is over, here or on the thread; removing the folder under a writer could leave it behind."""
        with self._lock:
            if not self._finished:
                self._cleanup = cleanup
                return
        cleanup()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def outcome(self) -> tuple[object, str | None]:
        """(what the work returned, None) or (None, the problem in one sentence)."""
        self._thread.join()
        return self._value, self._problem
