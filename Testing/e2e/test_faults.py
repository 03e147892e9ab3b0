"""Faults against `sam2fewshot segment` and its worker: a full disk, signals mid-run, a killed writer's
temporaries, a malicious pickle, two runs writing one output at once, the worker under malformed requests.
Real files, the real CLI (in-process and as subprocesses), the real SAM2 architecture with random weights.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from matrix_inputs import ENV, RANDOM, _cli, _inputs, _snapshot
from phantoms import phantom
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.common.files import replacing
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume

# --- faults -------------------------------------------------------------------------------------------


def _limit_file_size(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.skipif(sys.platform != "linux", reason="uses a file-size limit (Linux)")
def test_a_full_disk_leaves_the_old_result_whole_and_says_so_in_one_line(world, tmp_path):
    out = tmp_path / "result.nii"  # uncompressed: larger than the limit below
    argv = [*_inputs("registration", world), "--out", out, "-q"]
    first = _cli(argv)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    before = _snapshot(tmp_path)
    full = _cli(argv, preexec_fn=_limit_file_size(4000))
    assert full.wait(timeout=120) == 2
    [line] = full.stderr.read().strip().splitlines()
    assert line.startswith("sam2fewshot: error: cannot write"), line
    assert _snapshot(tmp_path) == before, "the old label file, sidecar and report are intact; no temporary is left"


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_signal_mid_run_leaves_no_output_and_the_old_one_whole(world, tmp_path, signum, code):
    big, truth = phantom((40, 48, 48), spacing=(1.0, 1.0, 3.0))
    write_volume(big, tmp_path / "big.nrrd")
    prompt = np.zeros_like(truth.volume.array)
    prompt[20] = truth.volume.array[20]
    write_labels(truth.with_array(prompt), tmp_path / "big_prompt.nii.gz")
    out = tmp_path / "result.nii.gz"
    old = b"an earlier result"
    out.write_bytes(old)
    # A suite started in the background (`pytest &`) runs with SIGINT ignored, and a child would inherit
    # that (Python then installs no KeyboardInterrupt handler): the CLI starts as a terminal starts it.
    run = _cli(["--query", tmp_path / "big.nrrd", "--prompt-labels", tmp_path / "big_prompt.nii.gz", "--out", out,
                "--report", tmp_path / "report.json", *RANDOM],
               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    seen = ""
    while "propagate" not in seen and time.monotonic() < deadline and run.poll() is None:
        seen += run.stderr.read(1)  # the progress bars: it is computing now
    os.kill(run.pid, signum)
    assert run.wait(timeout=30) == code
    err = run.stderr.read().strip().splitlines()
    if signum != signal.SIGKILL:
        assert err[-1] == {signal.SIGINT: "sam2fewshot: interrupted", signal.SIGTERM: "sam2fewshot: terminated"}[signum]
        assert not any("Traceback" in line for line in err)
    assert out.read_bytes() == old and not (tmp_path / "report.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary is left"


def test_a_killed_writers_temporaries_are_swept_by_the_next_run(world, tmp_path):
    out = tmp_path / "r.nii.gz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f".r.nii.gz.{dead.stdout.strip()}.abc123.tmp.nii.gz",
             tmp_path / f".r_report.json.{dead.stdout.strip()}.def456.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    live = tmp_path / f".r.nii.gz.{os.getpid()}.xyz789.tmp.nii.gz"  # a writer still running: left alone
    live.write_bytes(b"being written")
    assert main(["segment", *_inputs("registration", world), "--out", str(out), "-q"]) == 0
    assert not any(p.exists() for p in stale) and live.exists()
    assert read_labels(out).volume.array.any()


def test_a_malicious_pickle_as_checkpoint_runs_no_code(world, tmp_path, capfd):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Evil()}))
    argv = [*_inputs("propagate", world), "--checkpoint", str(tmp_path / "evil.pt"), "--config",
            "configs/sam2.1/sam2.1_hiera_t.yaml", "--image-size", "128", "--device", "cpu", "--out",
            str(tmp_path / "o.nii.gz"), "-q"]
    assert main(["segment", *argv]) == 2
    [line] = capfd.readouterr().err.strip().splitlines()
    assert "refusing to load evil.pt" in line and not marker.exists()


def test_two_runs_writing_one_output_at_once_leave_one_complete_result(world, tmp_path):
    out = tmp_path / "same.nii.gz"
    runs = [_cli([*_inputs("registration", world), "--out", out, "-q"]) for _ in range(2)]
    assert [r.wait(timeout=120) for r in runs] == [0, 0], [r.stderr.read() for r in runs]
    labels = read_labels(out)  # complete: readable, with its sidecar's names, from one of the runs
    assert labels.volume.array.any() and json.loads((tmp_path / "same_report.json").read_text())["method"] == \
        "registration"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.json", "same.nii.gz", "same_report.json"]


def test_replacing_never_leaves_half_a_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the disk filled up")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


# --- the worker ---------------------------------------------------------------------------------------


def test_the_worker_answers_every_malformed_request_and_its_memory_stays_flat(world, tmp_path):
    job = {"type": "job", "method": "propagate", "query": str(world / "q.nrrd"),
           "prompt_labels": str(world / "p.nii.gz"), "out": str(tmp_path / "o.seg.nrrd"),
           "report": str(tmp_path / "r.json"), "model": {"random_weights": True, "image_size": 128, "device": "cpu"}}
    bad = ["{ not json", "[" * 1000 + "]" * 1000, '{"type": "job", "id": "deep", "params": ' + "[" * 1000 + "]" * 1000
           + "}", json.dumps({**job, "id": "unknown-field", "telepathy": 1}),
           json.dumps({**job, "id": "huge", "query": "/" + "x" * (10 << 20)})]
    failing = [json.dumps({**job, "id": f"fail{n}", "query": str(world / "const.nrrd")}) for n in range(10)]
    log = (tmp_path / "worker.log").open("w+")  # the worker's stderr, never left to fill a pipe
    worker = subprocess.Popen([sys.executable, "-m", "SAM2FewShotLib.run.worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True, encoding="utf-8", env=ENV)

    def ask(line: str) -> dict:
        worker.stdin.write(line + "\n")
        worker.stdin.flush()
        while True:
            event = json.loads(worker.stdout.readline())
            if event["event"] in ("result", "error"):
                return event

    assert json.loads(worker.stdout.readline())["event"] == "ready"
    answers = [ask(line) for line in bad]
    assert [a["event"] for a in answers] == ["error"] * len(bad)
    assert [a["id"] for a in answers] == [None, None, None, "unknown-field", "huge"]
    assert "not a usable file name" in answers[-1]["message"]
    assert all("\n" not in a["message"] and len(a["message"]) <= 600 for a in answers)
    ask(failing[0])
    rss = psutil.Process(worker.pid).memory_info().rss
    answers = [ask(line) for line in failing[1:]]
    assert all(a["event"] == "error" and "nothing to segment" in a["message"] for a in answers)
    grown = (psutil.Process(worker.pid).memory_info().rss - rss) / 2 ** 20
    assert grown < 20, f"the worker grew by {grown:.1f} MB over 9 failing jobs"
    assert ask(json.dumps({**job, "id": "fine"}))["event"] == "result"  # still alive and working
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 130
    log.seek(0)
    assert "Traceback" not in log.read()
