"""The worker exits on its own when Slicer's process is gone (issue 25, item 3), idle or in the middle of a job.

A real process tree: a harness (a Linux child subreaper, so the orphaned worker or launcher becomes its child
and its exit code can be read) starts a "Slicer" process, which starts the worker, optionally through a
launcher process standing in for PythonSlicer (which outlives a Slicer crash), and hands the worker's pipes
to a holder process too, so the worker sees neither the end of its input nor a broken pipe: only its watch
of the parent can end it. The harness SIGKILLs "Slicer" and times the worker's exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import psutil
import pytest

from phantoms import write_prompted_query
from SAM2FewShotLib.run import owners
from SAM2FewShotLib.run.worker import CLIENT_GONE_EXIT, PARENT_POLL_S

LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call([sys.executable] + sys.argv[1:]))"

SLICER = r"""
import json, os, subprocess, sys, time
from SAM2FewShotLib.run.client import WorkerClient
cfg = json.loads(sys.argv[1])
env = WorkerClient(env={**os.environ, "OMP_NUM_THREADS": "1"}).environment()  # this process's record in it
if not cfg["record"]:
    del env["SAM2FEWSHOT_PARENT"]
argv = [sys.executable] + (["-c", cfg["launcher"]] if cfg["launcher"] else []) + ["-m", "SAM2FewShotLib.run.worker"]
worker = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(cfg["stderr"], "wb"),
                          env=env)
holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                          pass_fds=(worker.stdin.fileno(), worker.stdout.fileno()))
pid = json.loads(worker.stdout.readline())["pid"]
if cfg["job"]:
    worker.stdin.write((json.dumps(cfg["job"]) + "\n").encode())
    worker.stdin.flush()
    while json.loads(worker.stdout.readline())["event"] != "progress":
        pass
print(json.dumps({"worker": pid, "launcher": worker.pid if cfg["launcher"] else None, "holder": holder.pid}),
      flush=True)
time.sleep(300)
"""

HARNESS = r"""
import ctypes, json, os, subprocess, sys, time
import psutil
cfg = json.loads(sys.argv[2])
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
slicer = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
tree = json.loads(slicer.stdout.readline())
start = time.monotonic()
slicer.kill()
slicer.wait()
orphan, code = tree["launcher"] or tree["worker"], None  # reparented to this process
while code is None and time.monotonic() - start < 30:
    pid, status = os.waitpid(orphan, os.WNOHANG)
    if pid:
        code = os.waitstatus_to_exitcode(status)
    else:
        time.sleep(0.02)
seconds = time.monotonic() - start
worker_gone = not psutil.pid_exists(tree["worker"])
for pid in (tree["worker"], tree["launcher"], tree["holder"]):
    try:
        os.kill(pid, 9)
    except (TypeError, OSError):
        pass
print(json.dumps({"code": code, "seconds": seconds, "worker_gone": worker_gone}))
"""


def _orphan_the_worker(tmp_path, launcher: bool, record: bool, job: dict | None = None) -> dict:
    cfg = {"launcher": LAUNCHER if launcher else None, "record": record, "job": job,
           "stderr": str(tmp_path / "worker_stderr.txt")}
    run = subprocess.run([sys.executable, "-c", HARNESS, SLICER, json.dumps(cfg)], capture_output=True, text=True,
                         timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.splitlines()[-1])
    outcome["stderr"] = (tmp_path / "worker_stderr.txt").read_text(errors="replace")
    print(f"\nworker exit after its parent's SIGKILL: code {outcome['code']} in {outcome['seconds']:.2f} s "
          f"(launcher: {launcher}, record: {record}, busy: {job is not None})")
    return outcome


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the harness is a Linux child subreaper (prctl)")


@linux_only
def test_a_busy_worker_behind_a_launcher_exits_when_slicer_is_killed(tmp_path):
    """The PythonSlicer case: the worker's own parent (the launcher) lives on; the record names Slicer."""
    write_prompted_query(tmp_path, (32, 32, 32), "prompt.seg.nrrd")
    out = tmp_path / "out.seg.nrrd"
    job = {"type": "job", "id": "slow", "method": "propagate", "query": str(tmp_path / "query.nrrd"),
           "prompt_labels": str(tmp_path / "prompt.seg.nrrd"), "out": str(out), "report": str(tmp_path / "r.json"),
           "model": {"random_weights": True, "image_size": 256, "device": "cpu", "seed": 0}}
    outcome = _orphan_the_worker(tmp_path, launcher=True, record=True, job=job)
    assert outcome["code"] == CLIENT_GONE_EXIT and outcome["worker_gone"], outcome
    assert outcome["seconds"] < 3 * PARENT_POLL_S + 2
    assert not out.exists(), "the job ran to its end: the worker was not stopped in the middle of it"
    assert "Traceback" not in outcome["stderr"]


@linux_only
def test_an_idle_worker_started_without_a_record_exits_when_its_parent_is_killed(tmp_path):
    """Started straight with the protocol (no record): the worker watches the process that started it."""
    outcome = _orphan_the_worker(tmp_path, launcher=False, record=False)
    assert outcome["code"] == CLIENT_GONE_EXIT and outcome["worker_gone"], outcome
    assert outcome["seconds"] < 3 * PARENT_POLL_S + 2
    assert "Traceback" not in outcome["stderr"]


def test_the_watch_reports_a_killed_process_and_ignores_a_live_one():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone, live = threading.Event(), threading.Event()
    owners.watch(owners.owner_record(sleeper.pid), gone.set, interval=0.05)
    owners.watch(owners.owner_record(), live.set, interval=0.05)
    assert not gone.wait(0.3)
    sleeper.kill()
    sleeper.wait(timeout=10)
    assert gone.wait(5) and not live.is_set()


def test_the_worker_watches_the_record_it_is_given_else_its_parent():
    record = owners.owner_record()
    assert owners.parent_record({owners.PARENT_ENV: json.dumps(record)}) == record
    parent = owners.owner_record(os.getppid())
    assert parent["started"] == psutil.Process(os.getppid()).create_time()
    for text in ("", "not json", json.dumps({**record, "host": "elsewhere"}), json.dumps({"pid": "1"})):
        assert owners.parent_record({owners.PARENT_ENV: text}) == parent
    gone = {**record, "started": record["started"] - 3600}  # a gone Slicer's record is watched (and ends at once)
    assert owners.parent_record({owners.PARENT_ENV: json.dumps(gone)}) == gone
    assert owners.same_process(os.getpid(), gone["started"]) is False
