"""Issue 25, item 3: a volume is written once (not per Apply), off the GUI thread, into the cache, after a
free-space check; a run keeps the query's grid, not its voxels; the files go with the scene."""

from __future__ import annotations

import os
import shutil
import threading
from collections import namedtuple

import numpy as np
import pytest

from phantoms import phantom
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume_io import read_volume
from SAM2FewShotLib.run import job_folders
from SAM2FewShotLib.slicer import volume_store
from SAM2FewShotLib.slicer.volume_store import Preparation, VolumeStore, grid_of, jobs_root


def test_a_volume_is_written_once_and_read_back_exactly(tmp_path):
    image, _ = phantom((6, 20, 24), spacing=(0.8, 0.8, 2.5))
    store = VolumeStore(lambda: tmp_path / "jobs")
    first = store.file_for(image)
    written = first.stat().st_mtime_ns, first.stat().st_ino
    again = store.file_for(image.with_array(image.array.copy()))  # a new copy of the same voxels: the same file
    assert again == first and first.stat().st_ino == written[1]
    assert sorted(p.name for p in store.folder.iterdir()) == sorted(["owner.json", first.name])  # owned, for the sweep
    back = read_volume(first)
    assert np.array_equal(back.array, image.array) and back.array.dtype == image.array.dtype
    assert back.same_grid(image)
    moved = image.with_array(image.array.copy())
    moved = type(image)(moved.array, image.spacing, (1.0, 2.0, 3.0), image.direction)  # other geometry: new file
    assert store.file_for(moved) != first


def test_only_the_last_volumes_are_kept_and_clear_removes_the_folder(tmp_path):
    store = VolumeStore(lambda: tmp_path / "jobs", keep=2)
    image, _ = phantom((4, 16, 16))
    paths = []
    for n in range(4):
        paths.append(store.file_for(image.with_array(image.array + n)))
        os.utime(paths[-1], ns=(n * 10**9, n * 10**9))  # distinct ages, whatever the clock's resolution
    assert [p.exists() for p in paths] == [False, False, True, True]
    folder = store.folder
    store.clear()
    assert not folder.exists() and store.folder is None
    assert store.file_for(image).exists()  # a new scene: a new folder


def test_a_full_disk_is_one_sentence_and_nothing_is_written(tmp_path, monkeypatch):
    image, _ = phantom((4, 16, 16))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 2**20, 2**20))
    store = VolumeStore(lambda: tmp_path / "jobs")
    with pytest.raises(InputError, match=r"^not enough free disk space for the volume's working copy: 0\.0 GB "
                                         r"needed, 0\.0 GB free in .*; free some space or choose another cache "
                                         r"folder in the module's settings$"):
        store.file_for(image)
    assert sorted(p.name for p in store.folder.iterdir()) == ["owner.json"]


def test_the_grid_keeps_the_geometry_and_costs_no_memory():
    image, _ = phantom((40, 64, 64))
    grid = grid_of(image)
    assert grid.same_grid(image) and grid.array.shape == image.array.shape and grid.array.dtype == image.array.dtype
    assert grid.array.strides == (0, 0, 0) and not grid.array.flags.writeable
    assert grid.array.base.nbytes <= image.array.itemsize


def test_the_files_are_written_on_a_thread_and_a_failure_is_the_runs_one_sentence(tmp_path):
    gate = threading.Event()
    prepared = Preparation(lambda: (gate.wait(5), "job")[1])
    assert not prepared.done()  # the caller (the GUI) goes on while the files are written
    gate.set()
    assert prepared.outcome() == ("job", None) and prepared.done()

    def full():
        raise OSError(28, "No space left on device", str(tmp_path / "q.nrrd"))

    assert Preparation(full).outcome() == (None, f"its files could not be written ({tmp_path / 'q.nrrd'}): "
                                                 "No space left on device")
    assert Preparation(lambda: (_ for _ in ()).throw(InputError("select the query volume"))).outcome() == (
        None, "select the query volume")


def test_the_store_lives_in_the_cache_and_a_crashed_slicers_folder_is_swept(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM2FEWSHOT_CACHE", str(tmp_path / "cache"))
    assert jobs_root() == tmp_path / "cache" / volume_store.JOBS_FOLDER
    store = VolumeStore()
    path = store.file_for(phantom((4, 16, 16))[0])
    assert path.parent.parent == jobs_root()
    assert job_folders.sweep_stale_job_folders(jobs_root()) == []  # its owner (this process) runs: kept
    record = job_folders.read_owner(path.parent)
    record["pid"] = 2 ** 22 + 12345  # a process that is gone
    (path.parent / job_folders.OWNER_FILE).write_text(__import__("json").dumps(record), encoding="utf-8")
    assert job_folders.sweep_stale_job_folders(jobs_root()) == [path.parent]


def test_a_dropped_preparation_cleans_up_only_once_its_files_are_written(tmp_path):
    gate, calls = threading.Event(), []
    prepared = Preparation(lambda: (gate.wait(5), "job")[1])
    prepared.drop(lambda: calls.append("removed"))  # the run was cancelled while its files were written
    assert calls == []  # not under the writer's feet
    gate.set()
    prepared.join(5)
    assert calls == ["removed"]
    done = Preparation(lambda: "job")
    done.join(5)
    done.drop(lambda: calls.append("at once"))  # already written: cleaned up now
    assert calls == ["removed", "at once"]


def test_the_panel_and_a_live_session_share_a_file_each_keeping_it_until_it_lets_go(tmp_path):
    """One store for the panel's runs and the effect's session: a volume both use is written once, and a
    file goes only when no user keeps it."""
    store = VolumeStore(lambda: tmp_path / "jobs", keep=2)
    image, _ = phantom((4, 16, 16))
    shared = store.file_for(image, "session-1")  # the session writes it
    inode = shared.stat().st_ino
    assert store.file_for(image) == shared and shared.stat().st_ino == inode  # the panel's run: not written again
    assert store.kept() == [shared] and store.kept("session-1") == [shared]
    store.release("session-1")  # the session ended: the panel still keeps it
    assert shared.exists()
    mine = store.file_for(image.with_array(image.array + 1), "session-2")
    for n in (2, 3):  # the panel moves on to other volumes: its last two kept, the session's file too
        store.file_for(image.with_array(image.array + n))
    assert not shared.exists() and mine.exists() and len(list(store.folder.glob("*.nrrd"))) == 3
    store.release("session-2")
    assert not mine.exists() and len(store.kept()) == 2
    store.release("nobody")  # a session that never wrote: nothing else goes
    assert len(list(store.folder.glob("*.nrrd"))) == 2


def test_a_file_being_written_is_not_removed_by_another_users_trim(tmp_path, monkeypatch):
    """The panel's run and the session write on threads of their own: one's trim never takes the other's
    file between its write and its keeping."""
    store = VolumeStore(lambda: tmp_path / "jobs", keep=1)
    image, _ = phantom((4, 16, 16))
    writing, release = threading.Event(), threading.Event()
    from SAM2FewShotLib.io import volume_io

    original = volume_io.write_volume

    def slow_write(volume, path, compress=True):  # the session's file renamed into place, not yet kept
        out = original(volume, path, compress=compress)
        if threading.current_thread().name == "session":
            writing.set()
            release.wait(10)
        return out

    monkeypatch.setattr(volume_io, "write_volume", slow_write)
    result = {}
    thread = threading.Thread(target=lambda: result.update(path=store.file_for(image, "session-1")), name="session")
    thread.start()
    assert writing.wait(10)
    for n in (1, 2):  # the panel writes and trims while the session's file waits to be kept
        store.file_for(image.with_array(image.array + n))
    release.set()
    thread.join(10)
    assert result["path"].exists() and store.kept("session-1") == [result["path"]]
