"""A cohort folder that cannot be tricked: ids are names, not paths; one writer at a time; the manifest
is the truth. Real CLI, real files, real processes, the real SAM2 architecture with random weights."""

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

import numpy as np
import pytest
from permissions import SKIP_REASON, permissions_enforced

from phantoms import phantom
from SAM2FewShotLib.batch.lock import BEING_WRITTEN_S, STALE_S, FolderLock, process_start
from SAM2FewShotLib.batch.manifest import LOCK
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume

SHAPE = (8, 32, 32)
FAST = ["--random-weights", "--image-size", "128", "--device", "cpu", "--augmentations", "1",
        "--slices-per-structure", "2", "--top-k", "1", "--scheme", "pair", "--threads", "1", "-q"]


@pytest.fixture
def inputs(tmp_path):
    """Two query volumes and a labelled support case; the cohort's CSV is each test's own."""
    for n, name in enumerate(("q1", "q2")):
        image, _ = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=30 + n)
        write_volume(image, tmp_path / f"{name}.nrrd")
    support, labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=1)
    write_volume(support, tmp_path / "support.nrrd")
    write_labels(labels, tmp_path / "support_label.nii.gz")
    return tmp_path


def _csv(folder: Path, ids: list[str]) -> Path:
    listing = folder / "cohort_list.csv"
    rows = [f'{folder / f"q{1 + n % 2}.nrrd"},"{case_id}"' for n, case_id in enumerate(ids)]
    listing.write_text("query,id\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return listing


def _batch(folder: Path, listing: Path, out: Path) -> list[str]:
    return ["batch", "--queries", str(listing), "--out", str(out), "--support", str(folder / "support.nrrd"),
            str(folder / "support_label.nii.gz"), *FAST]


def _everything(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if "cache" not in p.parts}


def test_ids_are_names_not_paths_nothing_is_written_outside_the_folder(inputs, capsys):
    out, absolute = inputs / "nested" / "out", str(inputs / "abs_x")
    listing = _csv(inputs, ["../escaped_x", absolute])
    before = _everything(inputs)
    assert main(_batch(inputs, listing, out)) == 0, capsys.readouterr().err
    written = _everything(inputs) - before
    assert all(out in p.parents or p in (out, out.parent) for p in written), sorted(written)
    manifest = json.loads((out / "manifest.json").read_text())["cases"]
    assert set(manifest) == {"../escaped_x", absolute}  # the ids as the user wrote them
    assert (out / "%2E.%2Fescaped_x.nii.gz").is_file() and (out / "%2E.%2Fescaped_x_report.json").is_file()
    assert set(manifest["../escaped_x"]["files"]) == {"%2E.%2Fescaped_x.nii.gz", "%2E.%2Fescaped_x.json",
                                                      "%2E.%2Fescaped_x_report.json"}


@pytest.mark.parametrize("ids, words", [
    (["Case_A", "case_a"], "case case_a would write case_a.nii.gz, which is also written by case Case_A"),
    (["x", "x_report"], "x_report.json, which is also written by case x"),
    (["manifest"], "manifest.json, which is also the folder's own manifest.json"),
    (["cohort"], None), (["", "q"], None)])
def test_colliding_ids_are_refused_before_any_work_in_one_line_naming_both(inputs, capsys, ids, words):
    out = inputs / "out"
    code = main(_batch(inputs, _csv(inputs, ids), out))
    err = capsys.readouterr().err
    if words is None:  # 'cohort' writes cohort.nii.gz: no clash with cohort.csv; an empty id is the query's name
        assert code == 0, err
        return
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not out.exists(), "a refused run made the output folder"


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over_at_once(inputs, capsys):
    out, listing = inputs / "out", _csv(inputs, ["a", "b", "c", "d"])
    first = subprocess.Popen([sys.executable, "-m", "SAM2FewShotLib.cli", *_batch(inputs, listing, out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not (out / LOCK).exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.02)
    assert main(_batch(inputs, listing, out)) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"host {socket.gethostname()}, PID {first.pid}" in line and "in use by a batch run" in line, line
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert (out / LOCK).exists(), "the killed run's lock stays behind"
    assert main(_batch(inputs, listing, out)) == 0, capsys.readouterr().err
    assert not (out / LOCK).exists(), "a finished run leaves no lock"


def _lock_file(out: Path, host: str, pid: int, heartbeat: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"host": host, "pid": pid, "started": process_start(pid) if host == socket.gethostname() else 1.0,
              "heartbeat": heartbeat, "token": "theirs", "holder": "a batch run"}
    (out / LOCK).write_text(json.dumps(record))


def test_a_lock_on_another_host_holds_until_its_heartbeat_is_stale(tmp_path):
    out = tmp_path / "out"
    _lock_file(out, "node-7.cluster", 4242, time.time() - 5)
    with pytest.raises(Exception, match="host node-7.cluster, PID 4242"):
        FolderLock(out, LOCK).acquire()
    _lock_file(out, "node-7.cluster", 4242, time.time() - STALE_S - 1)
    with FolderLock(out, LOCK) as lock:
        assert lock.held() and json.loads((out / LOCK).read_text())["host"] == socket.gethostname()
    assert not (out / LOCK).exists()


def test_a_lock_being_written_is_not_taken_for_an_abandoned_one(tmp_path):
    """The race CI once hit: a second run read the first one's lock between its creation and its
    record, took it for a half-written abandoned lock, and ran beside it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text("")  # created exclusively, record not yet written (no hard links)
    writer = threading.Timer(0.5, _lock_file, (out, socket.gethostname(), os.getpid(), time.time()))
    writer.start()
    try:
        with pytest.raises(InputError, match=f"PID {os.getpid()}"):
            FolderLock(out, LOCK).acquire()
    finally:
        writer.join()
    (out / LOCK).write_text("")
    long_ago = time.time() - BEING_WRITTEN_S - 1  # an empty lock nobody finished: abandoned, taken at once
    os.utime(out / LOCK, (long_ago, long_ago))
    with FolderLock(out, LOCK) as lock:
        assert lock.held()
    assert sorted(p.name for p in out.iterdir()) == [], "the lock and its temporary are gone"


def test_a_reused_pid_on_this_host_is_not_the_holder(tmp_path):
    out = tmp_path / "out"
    _lock_file(out, socket.gethostname(), os.getpid(), time.time())
    with pytest.raises(Exception, match=f"PID {os.getpid()}"):  # this very process, alive: held
        FolderLock(out, LOCK).acquire()
    record = json.loads((out / LOCK).read_text())
    record["started"] -= 1000.0  # the PID is alive but started after the lock was written: another process
    (out / LOCK).write_text(json.dumps(record))
    with FolderLock(out, LOCK) as lock:
        assert lock.held()


def test_the_manifest_is_the_truth_an_output_replaced_by_hand_is_done_again(inputs, capsys):
    out, listing = inputs / "out", _csv(inputs, ["a"])
    assert main(_batch(inputs, listing, out)) == 0
    good = read_labels(out / "a.nii.gz")
    write_labels(good.with_array(np.zeros_like(good.volume.array)), out / "a.nii.gz")  # readable, and wrong
    capsys.readouterr()
    assert main(_batch(inputs, listing, out)) == 0
    assert "1 run now" in capsys.readouterr().out
    assert np.array_equal(read_labels(out / "a.nii.gz").volume.array, good.volume.array)
    assert "adopted" not in json.loads((out / "manifest.json").read_text())["cases"]["a"]
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["cases"]["a"]  # the writer died after writing the outputs, before recording them
    (out / "manifest.json").write_text(json.dumps(manifest))
    mtime = (out / "a.nii.gz").stat().st_mtime_ns
    assert main(_batch(inputs, listing, out)) == 0
    assert json.loads((out / "manifest.json").read_text())["cases"]["a"]["adopted"] is True
    assert (out / "a.nii.gz").stat().st_mtime_ns == mtime, "complete outputs not yet recorded are adopted"


@pytest.mark.parametrize("entry, words", [
    ("not a record", "is not a record"), ({"files": ["a.nii.gz"]}, "'files' is not a table"),
    ({"files": {"../../etc/passwd": [1, "x"]}}, "is not a name in the folder"),
    ({"files": {"a.nii.gz": "big"}}, "has no [size, sha256]")])
def test_a_damaged_manifest_record_is_one_line_not_a_traceback(inputs, capsys, entry, words):
    out = inputs / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "sam2fewshot-cohort-1", "cases": {"a": entry}}))
    assert main(_batch(inputs, _csv(inputs, ["a"]), out)) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert words in line and "'a'" in line, line


@pytest.mark.xdist_group("ray")  # its check of /tmp/ray holds only with no other Ray test running beside it
def test_on_ray_ids_stay_names_and_quiet_means_quiet_with_nothing_left_behind(inputs, tmp_path):
    pytest.importorskip("ray", reason="the cluster extra (ray) is not installed")
    out, home = inputs / "out", tmp_path / "home"
    listing = _csv(inputs, ["../escaped_x"])
    sessions = set(Path("/tmp/ray").glob("session_2*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    run = subprocess.run([sys.executable, "-m", "SAM2FewShotLib.cli", *_batch(inputs, listing, out), "--ray",
                          "--workers", "1"], capture_output=True, text=True, env={**env, "HOME": str(home)},
                         timeout=300)
    assert run.returncode == 0 and run.stderr == "", run.stderr[-3000:]
    assert (out / "%2E.%2Fescaped_x.nii.gz").is_file() and not (inputs / "escaped_x.nii.gz").exists()
    assert "Started a local Ray instance" in (out / "logs" / "ray.log").read_text()  # Ray's lines: in the folder
    assert (out / "logs" / "ray_session").is_dir()
    assert not (home / ".ray").exists(), "Ray wrote its token into the home folder"
    assert set(Path("/tmp/ray").glob("session_2*")) <= sessions, "the local Ray session folder was left"


@pytest.mark.parametrize("case_id, suffix, words", [
    ("q1", ".nrrd", "is also an input of this run (the query"),  # q1.nrrd: a case's output on its own query
    ("q2", ".nrrd", "is also an input of this run (the query of case"),  # on another case's query
    ("lab", ".nii.gz", "names-and-colours sidecar of the support labels"),  # lab.json: the labels' sidecar
])
def test_no_case_output_replaces_a_file_the_cohort_reads_refused_before_any_work(inputs, capsys, case_id, suffix,
                                                                               words):
    write_labels(read_labels(inputs / "support_label.nii.gz"), inputs / "lab.nrrd")  # names and colours: lab.json
    listing = _csv(inputs, [case_id, "other"])
    argv = ["batch", "--queries", str(listing), "--out", str(inputs), "--suffix", suffix, "--support",
            str(inputs / "support.nrrd"), str(inputs / "lab.nrrd"), *FAST]
    before = {p: p.read_bytes() for p in inputs.iterdir() if p.is_file()}
    assert main(argv) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert words in line, line
    assert {p: p.read_bytes() for p in inputs.iterdir() if p.is_file()} == before, "a refused run changed files"


@pytest.mark.skipif(not permissions_enforced(), reason=SKIP_REASON)
def test_a_folder_that_cannot_hold_the_lock_is_one_line(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InputError, match="cannot write into"):
            FolderLock(folder, LOCK).acquire()
    finally:
        folder.chmod(0o755)
