"""The worker's live session end to end: a real worker process (one for the module), the real sam2.1 tiny
architecture (random weights, 128 px), phantom files, the JSON-lines protocol and the client Slicer uses:
open, click, a drawn mask, propagate, status, bad requests, the end on volume change and close."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest

from phantoms import phantom
from SAM2FewShotLib.io.volume import LabelMap
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume
from SAM2FewShotLib.run import session_protocol as sp
from SAM2FewShotLib.run.client import JobFolder, WorkerClient, WorkerError
from SAM2FewShotLib.run.protocol import Job, ModelOptions

MODEL = ModelOptions(random_weights=True, image_size=128, device="cpu", seed=0, threads=1)
SHAPE = (8, 32, 32)  # 8 slices along k (3 mm slices): the acquisition axis
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    image, truth = phantom(SHAPE, spacing=(1.0, 1.0, 3.0))
    other, _ = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=3)
    write_volume(image, root / "volume.nrrd")
    write_volume(image, root / "same_volume.nrrd")  # the same content under another name
    write_volume(other, root / "other.nrrd")
    prompt = np.zeros_like(truth.volume.array)
    prompt[4] = truth.volume.array[4]
    write_labels(LabelMap(truth.volume.with_array(prompt), truth.segments), root / "prompt.nrrd")
    return {"root": root, "volume": str(root / "volume.nrrd"), "same": str(root / "same_volume.nrrd"),
            "other": str(root / "other.nrrd"), "prompt": str(root / "prompt.nrrd"), "truth": truth.volume.array}


@pytest.fixture(scope="module")
def client():
    c = WorkerClient(env=ENV)
    yield c
    c.shutdown(timeout=5.0)


def ask(client: WorkerClient, request, timeout: float = 60.0) -> dict:
    return client.wait(client.submit(request), timeout=timeout)


def refused(client: WorkerClient, message: dict) -> str:
    """The one error event a bad request gets (and nothing else for its id)."""
    request_id = client.submit(message)
    with pytest.raises(WorkerError) as info:
        client.wait(request_id, timeout=30)
    return str(info.value)


def open_session(client, path, request_id="s1", view=0, pause_s=0.05) -> dict:
    return ask(client, sp.SessionOpen(id=request_id, query=path, model=MODEL, slice=view, pause_s=pause_s))


def encoded(client, session_id) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = ask(client, sp.SessionStatus(id=f"q{time.monotonic_ns()}", session=session_id))
        if not status["encoding"]:
            return status
        time.sleep(0.1)
    raise AssertionError("background encoding did not finish")


def scratch_files(pid: int) -> list[str]:
    """The worker's open files whose name says they are our scratch (unlinked offload files)."""
    found = []
    for f in psutil.Process(pid).open_files():
        if "sam2fewshot-" in os.path.basename(f.path):
            found.append(f.path)
    return found


def test_open_click_draw_propagate_and_close(client, files):
    opened = open_session(client, files["volume"])
    assert opened["event"] == "session" and opened["session"] == "s1" and not opened["reused"]
    assert (opened["slices"], opened["slice_shape"], opened["axis"], opened["rows"], opened["columns"]) == \
        (8, [32, 32], "k", "j", "i")
    status = encoded(client, "s1")
    assert status["encoded"] == status["frames_encoded"] == 8 and status["encode_ms_per_slice"] > 0

    mask = ask(client, sp.SessionClick(id="c1", session="s1", slice=2, object=1, points=((12.0, 10.0, 1),)))
    assert mask["event"] == "mask" and not mask["encoded_now"] and mask["decoder_ms"] > 0
    clicked = sp.unpack_mask(mask["bits"], mask["shape"])
    assert clicked.shape == (32, 32) and int(clicked.sum()) == mask["voxels"]
    again = ask(client, sp.SessionClick(id="c2", session="s1", slice=2, object=1, points=((2.0, 2.0, 0),)))
    assert again["slice"] == 2 and again["object"] == 1

    drawn = files["truth"][6] == 1
    noted = ask(client, sp.SessionMask(id="m1", session="s1", slice=6, object=1, shape=(32, 32),
                                       bits=sp.pack_mask(drawn)))
    assert noted["event"] == "noted" and noted["voxels"] == int(drawn.sum())

    same = open_session(client, files["same"], request_id="s2", view=6)  # the same volume: the same session
    assert same["reused"] and same["session"] == "s1" and same["prompts"] == {"1": {"2": "click", "6": "drawn"}}

    with JobFolder() as folder:
        events = []
        result = client.wait(client.submit(sp.SessionPropagate(id="p1", session="s1", out=str(folder.labels),
                                                                report=str(folder.report))),
                             timeout=60, on_event=events.append)
        assert result["event"] == "result" and result["frames_encoded"] == 0 and result["session_reused"]
        assert any(e["event"] == "progress" and e.get("id") == "p1" for e in events)
        labels = read_labels(result["labels"])
        assert labels.volume.array.shape == SHAPE
        assert np.array_equal(labels.volume.array[6] == 1, drawn)  # the drawn mask, verbatim
        assert np.array_equal(labels.volume.array[2] == 1, sp.unpack_mask(again["bits"], again["shape"]))

    cleared = ask(client, sp.SessionClear(id="x1", session="s1", object=1, slice=6))
    assert cleared["removed"] == 1
    closed = ask(client, sp.SessionClose(id="z1", session="s1"))
    assert closed["event"] == "closed" and closed["frames_encoded"] == 8
    assert "no live session is open" in refused(client, sp.SessionStatus(id="q2", session="s1").to_message())


def test_bad_requests_get_one_error_each_and_the_worker_goes_on(client, files):
    sid = open_session(client, files["volume"], request_id="b1")["session"]
    click = {"type": "session_click", "id": "e", "session": sid, "slice": 1, "object": 1, "points": [[3, 3, 1]]}
    bad = [
        ({**click, "session": "nope"}, "not open"),
        ({**click, "slice": 8}, "outside the volume"),
        ({**click, "points": [[40, 3, 1]]}, "outside slice"),
        ({**click, "points": [[3, 3, 2]]}, "points must be"),
        ({**click, "points": []}, "points or a box"),
        ({**click, "box": [9, 9, 1, 1]}, "box must be"),
        ({**click, "object": 0}, "object must be"),
        ({**click, "colour": "red"}, "unknown key"),
        ({**click, "slice": "1"}, "slice must be int"),
        ({"type": "session_mask", "id": "e", "session": sid, "slice": 1, "object": 1, "shape": [32, 32],
          "bits": "AAAA"}, "a 32 x 32 mask packs into"),
        ({"type": "session_mask", "id": "e", "session": sid, "slice": 1, "object": 1, "shape": [31, 32],
          "bits": sp.pack_mask(np.zeros((31, 32), bool))}, "has shape"),
        ({"type": "session_open", "id": "e", "query": "/no/such/volume.nrrd"}, "does not exist"),
        ({"type": "session_open", "id": "e", "query": files["volume"], "frames": {"slice_range": [0, 2]}},
         "takes no slice_range"),
        ({"type": "session_open", "id": "e", "query": files["volume"], "pause_s": -1}, "pause_s"),
        ({"type": "session_propagate", "id": "e", "session": sid, "out": "/x/y.nrrd"}, "missing the key 'report'"),
        ({"type": "session_wave", "id": "e"}, "unknown request type"),
    ]
    for message, words in bad:
        assert words in refused(client, message), message
    folder = files["root"]
    assert "nothing to propagate" in refused(client, sp.SessionPropagate(
        id="e", session=sid, out=str(folder / "r.nrrd"), report=str(folder / "r_report.json")).to_message())
    assert ask(client, sp.SessionStatus(id="ok", session=sid))["session"] == sid  # still serving
    ask(client, sp.SessionClose(id="z", session=sid))


def test_another_volume_ends_the_session_and_close_leaves_nothing_at_work(client, files):
    sid = open_session(client, files["volume"], request_id="v1")["session"]
    ask(client, sp.SessionClick(id="c", session=sid, slice=4, object=1, box=(8.0, 8.0, 20.0, 20.0)))
    other = open_session(client, files["other"], request_id="v2", view=3)
    assert not other["reused"] and other["session"] == "v2"
    assert "is not open" in refused(client, sp.SessionStatus(id="q", session=sid).to_message())
    ask(client, sp.SessionClose(id="z", session="v2"))
    worker = psutil.Process(client.pid)
    assert scratch_files(client.pid) == []
    before = sum(worker.cpu_times()[:2])
    time.sleep(0.5)
    assert sum(worker.cpu_times()[:2]) - before < 0.1  # no encoding goes on
    assert not any(Path(ENV["SAM2FEWSHOT_CACHE"]).glob("scratch/*"))  # the worker's cache folder


def test_a_click_sent_during_a_job_is_answered_after_it_and_another_model_ends_the_session(client, files):
    sid = open_session(client, files["volume"], request_id="j1")["session"]
    with JobFolder() as folder:
        job = Job(id="job", method="propagate", query=files["volume"], prompt_labels=files["prompt"],
                  out=str(folder.labels), report=str(folder.report), model=MODEL)
        client.submit(job)
        click = client.submit(sp.SessionClick(id="during", session=sid, slice=3, object=1, points=((9.0, 9.0, 1),)))
        ends = []
        client.wait(click, timeout=60, on_event=lambda e: ends.append(e["id"]) if e["event"] in ("result", "mask")
                    else None)
        assert ends == ["job", "during"]  # the worker is sequential: the job, then the click, one model
        other = Job(id="job2", method="propagate", query=files["volume"], prompt_labels=files["prompt"],
                    out=str(folder.labels), report=str(folder.report), model=replace(MODEL, seed=1))
        assert ask(client, other)["event"] == "result"
    assert "no live session is open" in refused(client, sp.SessionStatus(id="q", session=sid).to_message())


def test_jobs_and_the_live_session_share_features_and_the_session_is_never_evicted(client, files, tmp_path):
    """A job on the session's volume encodes nothing again, nor a session opened on a job's volume; jobs on
    more volumes than the runner keeps warm leave the session's features alone; they go with the session."""
    others = []
    for seed in (10, 11, 12):  # one more than the runner keeps warm (run/runner.py MAX_SESSIONS)
        image, _ = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=seed)
        others.append(str(write_volume(image, tmp_path / f"other{seed}.nrrd")))

    def job(job_id, query, folder):
        return ask(client, Job(id=job_id, method="propagate", query=query, prompt_labels=files["prompt"],
                               out=str(folder.labels), report=str(folder.report), model=MODEL))

    with JobFolder() as folder:
        assert job("before", files["other"], folder)["frames_encoded"] == SHAPE[0]
        opened = open_session(client, files["other"], request_id="h1", view=2)
        assert opened["encoded"] == SHAPE[0]  # the job's features, at once
        for n, path in enumerate(others):
            assert job(f"elsewhere{n}", path, folder)["frames_encoded"] == SHAPE[0]
        mask = ask(client, sp.SessionClick(id="hc", session="h1", slice=5, object=1, points=((12.0, 10.0, 1),)))
        assert not mask["encoded_now"]  # still warm after jobs on three other volumes
        again = job("again", files["other"], folder)
        assert again["frames_encoded"] == 0 and again["session_reused"]
        ask(client, sp.SessionClose(id="hz", session="h1"))
        assert job("after", files["other"], folder)["frames_encoded"] == SHAPE[0]  # gone with the session
    assert scratch_files(client.pid) == []
