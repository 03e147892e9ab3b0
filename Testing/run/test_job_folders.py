"""Job folders record their owner, and the sweep removes only those of a process that is gone (issue 25, item 3):
real processes hold the folders, a killed one's folder goes, a live one's stays, a PID whose start time does
not match counts as reused, and folders without a readable record follow the age rule."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from SAM2FewShotLib.run import job_folders, owners
from SAM2FewShotLib.run.client import JobFolder
from SAM2FewShotLib.run.job_folders import OWNER_FILE, UNKNOWN_OWNER_MAX_AGE_S, sweep_stale_job_folders

HOLD_A_FOLDER = ("import sys, time; from SAM2FewShotLib.run.client import JobFolder; "
                 "print(JobFolder(sys.argv[1]).path, flush=True); time.sleep(120)")


@pytest.fixture
def holder(tmp_path):
    """A child process (another Slicer, as far as the sweep knows) that made a job folder and still runs."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_A_FOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    folder = Path(proc.stdout.readline().strip())
    yield proc, folder
    proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()


def _folder(root: Path, name: str, record: object = None, age_s: float = 0.0) -> Path:
    folder = root / f"{job_folders.PREFIX}{name}"
    folder.mkdir()
    (folder / "query.nrrd").write_bytes(b"data")
    if record is not None:
        (folder / OWNER_FILE).write_text(record if isinstance(record, str) else json.dumps(record))
    stamp = time.time() - age_s
    os.utime(folder, (stamp, stamp))
    return folder


def test_a_job_folder_records_its_owner(tmp_path):
    with JobFolder(tmp_path) as folder:
        record = json.loads((folder.path / OWNER_FILE).read_text())
        assert record == {"pid": os.getpid(), "started": psutil.Process().create_time(), "host": socket.gethostname()}
        assert job_folders.read_owner(folder.path) == record and owners.owner_alive(record) is True


def test_a_live_owners_folder_is_kept_and_a_killed_owners_folder_removed(holder, tmp_path):
    proc, folder = holder
    assert folder.parent == tmp_path and job_folders.read_owner(folder)["pid"] == proc.pid
    with JobFolder(tmp_path) as own:
        assert sweep_stale_job_folders(tmp_path) == []
        assert folder.is_dir() and own.path.is_dir()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert sweep_stale_job_folders(tmp_path) == [folder]
        assert not folder.exists() and own.path.is_dir()


def test_a_pid_that_now_belongs_to_a_later_process_counts_as_gone(holder, tmp_path):
    """PID reuse, simulated: the record names a live process but a start time that is not its own."""
    proc, _ = holder
    started = psutil.Process(proc.pid).create_time()
    host = socket.gethostname()
    reused = _folder(tmp_path, "reused", {"pid": proc.pid, "started": started - 3600, "host": host})
    close = _folder(tmp_path, "close", {"pid": proc.pid, "started": started + 0.5, "host": host})  # clock jitter
    assert sweep_stale_job_folders(tmp_path) == [reused]
    assert close.is_dir() and proc.poll() is None


def test_folders_without_a_record_this_host_can_check_follow_the_age_rule(tmp_path):
    day = UNKNOWN_OWNER_MAX_AGE_S
    other_host = {"pid": os.getpid(), "started": psutil.Process().create_time(), "host": socket.gethostname() + "-x"}
    young = [_folder(tmp_path, "none"), _folder(tmp_path, "garbage", "{not json"), _folder(tmp_path, "list", "[1]"),
             _folder(tmp_path, "other-host", other_host), _folder(tmp_path, "bad-pid", {"pid": "x", "host": "h"})]
    old = [_folder(tmp_path, f"old-{p.name}", (p / OWNER_FILE).read_text() if (p / OWNER_FILE).exists() else None,
                   age_s=day + 60) for p in young]
    recent = _folder(tmp_path, "almost-a-day", age_s=day - 60)
    assert sweep_stale_job_folders(tmp_path) == sorted(old)
    assert all(p.is_dir() for p in young) and recent.is_dir()


def test_the_sweep_touches_nothing_but_job_folders(tmp_path):
    gone = {"pid": 2 ** 22 + 1, "started": 1.0, "host": socket.gethostname()}  # above Linux's largest PID
    other = tmp_path / "other-folder"
    other.mkdir()
    (other / OWNER_FILE).write_text(json.dumps(gone))
    (tmp_path / f"{job_folders.PREFIX}file").write_text(json.dumps(gone))
    target = _folder(tmp_path, "target", gone)
    link = tmp_path / f"{job_folders.PREFIX}link"
    link.symlink_to(target)
    assert sweep_stale_job_folders(tmp_path) == [target]
    assert other.is_dir() and (tmp_path / f"{job_folders.PREFIX}file").is_file() and link.is_symlink()
    assert sweep_stale_job_folders(tmp_path / "missing") == []


def test_the_background_sweep_runs_once_per_process(tmp_path, monkeypatch):
    monkeypatch.setattr(job_folders, "_swept", threading.Lock())  # a fresh process, as far as the sweep knows
    stale = _folder(tmp_path, "stale", {"pid": 2 ** 22 + 1, "started": 1.0, "host": socket.gethostname()})
    thread = job_folders.sweep_in_background(tmp_path)
    thread.join(timeout=30)
    assert not stale.exists()
    assert job_folders.sweep_in_background(tmp_path) is None
