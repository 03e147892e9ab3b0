"""The background worker end to end: a real subprocess, the real sam2.1 tiny architecture (random
weights, image size 256), phantom files, the JSON-lines protocol and the client Slicer uses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from phantoms import phantom
from SAM2FewShotLib.io.volume import LabelMap
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume
from SAM2FewShotLib.run.client import (
    JobFolder,
    WorkerClient,
    WorkerError,
    kill_tree,
    read_result,
)
from SAM2FewShotLib.run.job_folders import OWNER_FILE
from SAM2FewShotLib.run.protocol import (
    FrameOptions,
    Job,
    ModelOptions,
    ProtocolError,
    encode,
    parse_request,
)

MODEL = {"random_weights": True, "image_size": 256, "device": "cpu", "seed": 0}
SHAPE = (8, 32, 32)  # 8 slices along k: the thick-slice (auto) axis
# One torch thread: on a shared 2-core machine more threads only contend (about 3x slower here).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A query, a prompt label file (the middle slice of its truth) and a labelled support case."""
    root = tmp_path_factory.mktemp("worker_data")
    image, truth = phantom(SHAPE, spacing=(1.0, 1.0, 3.0))
    prompt = np.zeros_like(truth.volume.array)
    prompt[4] = truth.volume.array[4]
    support_image, support_labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=1)
    paths = {"query": root / "query.nrrd", "prompt": root / "prompt.nrrd",
             "support": root / "support.nrrd", "support_labels": root / "support_labels.seg.nrrd"}
    write_volume(image, paths["query"])
    write_labels(LabelMap(truth.volume.with_array(prompt), truth.segments), paths["prompt"])
    write_volume(support_image, paths["support"])
    write_labels(support_labels, paths["support_labels"])
    return {k: str(v) for k, v in paths.items()} | {"image": image, "prompt_array": prompt}


def propagate_job(data, folder: JobFolder, **extra) -> dict:
    return {"method": "propagate", "query": data["query"], "prompt_labels": data["prompt"],
            "out": str(folder.labels), "report": str(folder.report), "model": MODEL, **extra}


def fewshot_job(data, folder: JobFolder) -> dict:
    return {"method": "matched-support", "query": data["query"],
            "supports": [[data["support"], data["support_labels"]]],
            "out": str(folder.labels), "report": str(folder.report), "model": MODEL,
            "params": {"augmentations": 1, "slices_per_structure": 2, "features": "intensity", "top_k": 1}}


def events_until(client: WorkerClient, stop, timeout: float = 120.0) -> list[dict]:
    """Poll (as the Slicer timer does) until ``stop(event)``; every event seen, in order."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in client.poll():
            seen.append(event)
            if stop(event):
                return seen
        time.sleep(0.01)
    raise AssertionError(f"no matching event within {timeout} s; saw {seen[-5:]}")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def client():
    c = WorkerClient(env=ENV)
    yield c
    c.shutdown(timeout=2.0)


def test_progress_result_and_a_warm_second_run(client, data):
    times, results = [], []
    for n in range(2):
        with JobFolder() as folder:
            start = time.perf_counter()
            job_id = client.submit(propagate_job(data, folder))
            events = events_until(client,
                                  lambda e, job=job_id: e.get("id") == job and e["event"] in ("result", "error"))
            times.append(time.perf_counter() - start)
            result = events[-1]
            assert result["event"] == "result", result
            labels, report = read_result(result)
            assert labels.volume.same_grid(data["image"])
            assert np.array_equal(labels.volume.array[4], data["prompt_array"][4])  # the prompt, verbatim
            assert report["method"] == "propagate" and report["worker"]["session_reused"] == (n == 1)
            steps = [e for e in events if e["event"] == "progress" and e["stage"] == "propagate forward"]
            assert [e["done"] for e in steps] == list(range(1, steps[0]["total"] + 1))
            assert {e["id"] for e in events if e["event"] in ("progress", "result")} == {job_id}
            results.append(result)
        assert not folder.path.exists()
    first, second = results
    assert first["frames_encoded"] == SHAPE[0] and not first["session_reused"]
    assert second["frames_encoded"] == 0 and second["session_reused"]
    assert second["seconds"] < first["seconds"]
    assert client.stray_lines == []
    print(f"\nworker protocol, {SHAPE[0]} slices of {SHAPE[1]}x{SHAPE[2]}, sam2.1 tiny (random) at 256 px, CPU: "
          f"first run on a fresh worker {first['seconds']:.2f} s in the worker ({times[0]:.2f} s round trip), "
          f"second run on the warm worker {second['seconds']:.2f} s ({times[1]:.2f} s round trip)")


def test_invalid_requests_are_answered_and_the_worker_goes_on(data, tmp_path):
    """Raw protocol: every stdout line is a JSON event; each bad request gets one error line."""
    bad_volume = tmp_path / "broken.nrrd"
    bad_volume.write_bytes(b"NRRD0004\nthis is not an image\n")
    out, report = tmp_path / "out.seg.nrrd", str(tmp_path / "report.json")
    base = {"type": "job", "query": data["query"], "prompt_labels": data["prompt"], "out": str(out),
            "report": report, "model": MODEL}
    requests = [
        "this is not JSON",
        "[1, 2]",
        json.dumps({"type": "job", "id": "missing-keys", "method": "propagate"}),
        json.dumps({**base, "id": "unknown-method", "method": "telepathy"}),
        json.dumps({**base, "id": "missing-file", "method": "propagate", "query": str(tmp_path / "nothing.nrrd")}),
        json.dumps({**base, "id": "unreadable", "method": "propagate", "query": str(bad_volume)}),
        json.dumps({**base, "id": "valid", "method": "propagate"}),
        json.dumps({"type": "shutdown"}),
    ]
    run = subprocess.run([sys.executable, "-m", "SAM2FewShotLib.run.worker"], input="\n".join(requests) + "\n",
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    events = [json.loads(line) for line in run.stdout.splitlines()]  # nothing but JSON lines
    assert events[0]["event"] == "ready" and events[0]["devices"] == {"cuda": [], "mps": False}  # this CPU machine
    answers = [(e["event"], e["id"]) for e in events if e["event"] in ("result", "error")]
    assert answers == [("error", None), ("error", None), ("error", "missing-keys"), ("error", "unknown-method"),
                       ("error", "missing-file"), ("error", "unreadable"), ("result", "valid")]
    messages = {e["id"]: e["message"] for e in events if e["event"] == "error"}
    assert "missing the key 'query'" in messages["missing-keys"]
    assert "unknown method 'telepathy'" in messages["unknown-method"]
    assert "does not exist" in messages["missing-file"] and "cannot read" in messages["unreadable"]
    assert all("\n" not in m for m in messages.values())
    assert read_labels(out).volume.same_grid(data["image"])


@pytest.mark.skipif(sys.platform != "linux", reason="uses an address-space limit (Linux)")
def test_out_of_memory_is_one_clear_error_and_the_worker_goes_on(data, tmp_path):
    """A real allocation failure: the worker runs under a 3 GiB address-space limit and a job asks
    for 4096-px frames (805 MB per batch input, more in the encoder)."""
    import torch

    if torch.version.cuda:  # CUDA builds reserve more address space than the limit at import
        pytest.skip("needs a CPU build of torch")
    limited_worker = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
                      "runpy.run_module('SAM2FewShotLib.run.worker', run_name='__main__')")
    base = {"type": "job", "method": "propagate", "query": data["query"], "prompt_labels": data["prompt"],
            "out": str(tmp_path / "out.seg.nrrd"), "report": str(tmp_path / "report.json")}
    requests = [{**base, "id": "huge", "model": {**MODEL, "image_size": 4096}}, {**base, "id": "small", "model": MODEL}]
    run = subprocess.run([sys.executable, "-c", limited_worker], capture_output=True, text=True,
                         input="".join(json.dumps(r) + "\n" for r in requests), timeout=120, env=ENV)
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    answers = [e for e in answers if e["event"] in ("result", "error")]
    assert [(e["event"], e["id"]) for e in answers] == [("error", "huge"), ("result", "small")], run.stderr[-2000:]
    assert answers[0]["message"].startswith("out of memory: try a smaller model")
    assert run.returncode == 0


def test_a_job_survives_the_protocol_round_trip():
    job = Job(id="j", method="matched-support", query="q.nrrd", out="o.seg.nrrd", report="r.json",
              supports=(("s.nrrd", "s.seg.nrrd"),), model=ModelOptions(random_weights=True, image_size=256),
              frames=FrameOptions(axis="axial", slice_range=(2, 5)), params={"top_k": 2})
    assert parse_request(encode(job.to_message())) == job
    with pytest.raises(ProtocolError, match="model.image_size must be int or null"):
        parse_request(encode({**job.to_message(), "model": {"image_size": True}}))


def test_library_output_never_reaches_the_protocol_stream():
    code = ("import os, sys; from SAM2FewShotLib.run import worker, protocol; out = worker.claim_stdout(); "
            "print('print noise'); sys.stdout.flush(); os.write(1, b'fd-level noise\\n'); "
            "worker.Emitter(out).send(protocol.log('info', 'only me'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert [json.loads(line) for line in run.stdout.splitlines()] == [{"event": "log", "level": "info",
                                                                        "message": "only me"}]
    assert "print noise" in run.stderr and "fd-level noise" in run.stderr


def test_matched_support_and_a_bad_job_through_the_client(client, data):
    with JobFolder() as folder:
        bad = client.submit({**fewshot_job(data, folder), "params": {"top_k": "three"}})
        with pytest.raises(WorkerError, match="top_k must be a int"):
            client.wait(bad, timeout=120)
        job_id = client.submit(fewshot_job(data, folder))
        labels, report = read_result(client.wait(job_id, timeout=120))
    assert labels.volume.same_grid(data["image"])
    assert report["method"] == "matched-support"
    assert [s["name"] for s in report["segments"]] == ["structure_1", "structure_2"]


def test_registration_job(client, data):
    pytest.importorskip("SAM2FewShotLib.methods.registration")
    with JobFolder() as folder:
        job = {**fewshot_job(data, folder), "method": "registration", "params": {}}
        labels, report = read_result(client.wait(client.submit(job), timeout=120))
    assert labels.volume.same_grid(data["image"])
    assert {s.name for s in labels.segments} >= {"structure_1", "structure_2"}


def test_cancel_kills_the_tree_at_once_and_a_new_job_starts_a_fresh_worker(client, data):
    folder = JobFolder()
    job_id = client.submit(propagate_job(data, folder))
    events = events_until(client, lambda e: e["event"] in ("result", "error")
                          or (e["event"] == "progress" and e["stage"].startswith("propagate")))
    assert events[-1]["event"] == "progress", events[-1]  # still running
    pid = client.pid
    tree = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    start = time.perf_counter()
    client.cancel()  # returns at once: the tree is killed on a thread of its own
    elapsed = time.perf_counter() - start
    assert not client.is_alive and client.reapers and client.reapers[-1] is not threading.current_thread()
    client.join_reapers(timeout=10)
    assert all(gone(p) for p in tree)
    time.sleep(0.2)
    assert [p.name for p in folder.path.iterdir()] == [OWNER_FILE]  # no label file, no report, no temporary file
    assert job_id not in client.pending and not client.is_alive
    folder.remove()
    print(f"\ncancel: returned in {elapsed * 1000:.0f} ms; worker tree of {len(tree)} process(es) gone")

    with JobFolder() as folder:
        result = client.wait(client.submit(propagate_job(data, folder)), timeout=120)
        assert client.pid != pid and result["frames_encoded"] == SHAPE[0]
        assert read_labels(result["labels"]).volume.same_grid(data["image"])


def test_a_killed_worker_is_reported_not_awaited(client, data):
    with JobFolder() as folder:
        job_id = client.submit(propagate_job(data, folder))
        events_until(client, lambda e: e["event"] == "progress" or e["event"] in ("result", "error"))
        os.kill(client.pid, signal.SIGKILL)
        start = time.perf_counter()
        with pytest.raises(WorkerError, match=r"ran out of memory and was stopped by the system \(the worker was"):
            client.wait(job_id, timeout=30)
        assert time.perf_counter() - start < 5.0
        assert not folder.labels.exists()
    assert not client.is_alive and client.pending == []


def test_kill_tree_takes_the_children_too():
    child = "import time; time.sleep(60)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 20
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) == 2
    start = time.perf_counter()
    kill_tree(proc.pid)
    assert time.perf_counter() - start < 1.0 and all(gone(p) for p in tree)
    proc.wait(timeout=1)


def test_guided_and_retrieval_jobs_on_one_warm_worker(client, data, tmp_path):
    """Every engine method the panel offers runs through the worker protocol."""
    library = tmp_path / "library"
    library.mkdir()
    (library / "case1.nrrd").symlink_to(data["support"])
    (library / "case1.seg.nrrd").symlink_to(data["support_labels"])
    with JobFolder() as folder:
        guided = {**fewshot_job(data, folder), "method": "guided",
                  "params": {"prior": "registration", "prompt_type": "box", "box_margin": 2}}
        labels, report = read_result(client.wait(client.submit(guided), timeout=180))
        assert labels.volume.same_grid(data["image"]) and report["method"] == "guided"
        retrieval = {"method": "retrieval", "query": data["query"], "library": str(library), "out": str(folder.labels),
                     "report": str(folder.report), "model": MODEL, "params": {"top_k": 1, "features": "sam2"}}
        labels, report = read_result(client.wait(client.submit(retrieval), timeout=180))
    assert labels.volume.same_grid(data["image"])
    assert [s.name for s in labels.segments] == ["structure_1", "structure_2"]
    assert report["inputs"]["library"] == str(library)
    with JobFolder() as folder:  # a retrieval job without its library: one clear line, the worker goes on
        wrong = {**retrieval, "library": None, "supports": [[data["support"], data["support_labels"]]],
                 "out": str(folder.labels), "report": str(folder.report)}
        with pytest.raises(WorkerError, match="retrieval needs a library"):
            client.wait(client.submit(wrong), timeout=60)
        assert not folder.labels.exists()
