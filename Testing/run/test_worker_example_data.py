"""The worker's ``example_data`` request: the demo's MSD pair from the cache (a real worker subprocess), the
download path itself (MD5 check, unpacking) in this process from a local tar, and the failures as one plain
error. Nothing is downloaded: a fake MSD task is built from phantoms, and the network is a closed port."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from phantoms import phantom
from SAM2FewShotLib.io import example_data
from SAM2FewShotLib.io.example_data import DEMO_QUERY, DEMO_SUPPORT
from SAM2FewShotLib.io.volume_io import write_volume
from SAM2FewShotLib.run import protocol
from SAM2FewShotLib.run.client import WorkerClient, WorkerError
from SAM2FewShotLib.run.worker import Emitter, Worker

TASK = "Task04_Hippocampus"
DATASET = {"labels": {"0": "background", "1": "Anterior", "2": "Posterior"}}
CLOSED = "http://127.0.0.1:9"  # the discard port: connections are refused at once
# One torch thread: on a shared 2-core machine more threads only contend. Every HTTP(S) request goes to a
# closed port, so nothing can be downloaded even on a machine with internet.
PROXIES = {"https_proxy": CLOSED, "HTTPS_PROXY": CLOSED, "http_proxy": CLOSED, "HTTP_PROXY": CLOSED}


def worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    return {**env, "OMP_NUM_THREADS": "1", **PROXIES}


def write_task(root: Path) -> Path:
    """A small MSD-layout hippocampus task (the demo's two cases and one more) under ``root``/Task04_Hippocampus:
    plain label files without names, as the MSD's are."""
    task = root / TASK
    for folder in ("imagesTr", "labelsTr"):
        (task / folder).mkdir(parents=True)
    for seed, case in enumerate((DEMO_QUERY, DEMO_SUPPORT, "hippocampus_001")):
        image, labels = phantom((8, 24, 20), spacing=(1.0, 1.0, 1.0), origin=(3.0 * seed, 0.0, 0.0), seed=seed)
        write_volume(image, task / "imagesTr" / f"{case}.nii.gz")
        write_volume(labels.volume, task / "labelsTr" / f"{case}.nii.gz")
    (task / "dataset.json").write_text(json.dumps(DATASET), encoding="utf-8")
    return task


def msd_tar(tmp_path: Path) -> tuple[Path, str]:
    """The fake task as the MSD ships it, one tar (macOS '._' files included); its path and MD5."""
    task = write_task(tmp_path / "source")
    archive = tmp_path / "Task04_Hippocampus.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(task, arcname=TASK)
        junk = tarfile.TarInfo(f"{TASK}/imagesTr/._{DEMO_QUERY}.nii.gz")
        junk.size = 3
        tar.addfile(junk, io.BytesIO(b"abc"))
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def cache_data() -> Path:
    return Path(os.environ["SAM2FEWSHOT_CACHE"]) / "data"


def run_in_process(request: protocol.ExampleData) -> list[dict]:
    stream = io.BytesIO()
    Worker(Emitter(stream)).run(request)
    return [json.loads(line) for line in stream.getvalue().decode().splitlines()]


def test_the_request_and_its_event_travel_the_protocol():
    request = protocol.ExampleData(id="e1")
    assert protocol.parse_request(protocol.encode(request.to_message())) == request
    for bad in ({"type": "example_data", "id": ""}, {"type": "example_data", "id": "e2", "data": "/x"}):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_request(protocol.encode(bad))
    event = protocol.example("e1", "/c/q.nii.gz", "/c/s.nii.gz", "/c/l.nii.gz", "q", "s", {1: "anterior"})
    assert protocol.parse_event(protocol.encode(event)) == {**event, "names": {"1": "anterior"}}
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_event(protocol.encode({k: v for k, v in event.items() if k != "support_labels"}))


def test_a_real_worker_answers_with_the_cached_pair_and_downloads_nothing():
    task = write_task(cache_data())  # the cache as a first download left it
    with WorkerClient(env=worker_env()) as client:
        job_id = client.submit(protocol.ExampleData(id="example-1"))
        seen: list[dict] = []
        event = client.wait(job_id, timeout=120, on_event=seen.append)
        assert client.pending == []
    assert event["event"] == "example" and event["id"] == "example-1"
    assert (event["query_case"], event["support_case"]) == (DEMO_QUERY, DEMO_SUPPORT)
    assert Path(event["query"]) == task / "imagesTr" / f"{DEMO_QUERY}.nii.gz"
    assert Path(event["support"]) == task / "imagesTr" / f"{DEMO_SUPPORT}.nii.gz"
    assert Path(event["support_labels"]) == task / "labelsTr" / f"{DEMO_SUPPORT}.nii.gz"
    assert event["names"] == {"1": "anterior hippocampus", "2": "posterior hippocampus"}
    assert [(e["done"], e["total"]) for e in seen if e["event"] == "progress"] == [(0, 1), (1, 1)]
    assert not any("download" in e.get("message", "") for e in seen)


def test_a_real_worker_offline_says_so_in_one_plain_sentence():
    with WorkerClient(env=worker_env()) as client:
        job_id = client.submit(protocol.ExampleData(id="example-2"))
        with pytest.raises(WorkerError) as failed:
            client.wait(job_id, timeout=120)
        assert client.pending == [] and client.is_alive  # the worker waits for the next request
    message = str(failed.value)
    assert message.startswith("the download failed (") and "internet connection" in message, message
    assert "\n" not in message and "--" not in message and "Traceback" not in message
    assert not list(cache_data().glob("*.tar"))  # no partial download left behind


def test_the_download_is_checked_and_unpacked_once(tmp_path, monkeypatch, caplog):
    archive, md5 = msd_tar(tmp_path)
    monkeypatch.setattr(example_data, "MSD_HIPPOCAMPUS_URL", archive.as_uri())
    monkeypatch.setattr(example_data, "MSD_HIPPOCAMPUS_MD5", md5)
    events = run_in_process(protocol.ExampleData(id="e3"))
    assert [e["event"] for e in events] == ["progress", "progress", "example"]
    assert any("downloading" in r.getMessage() for r in caplog.records)  # the worker's log event (main())
    answer = events[-1]
    assert Path(answer["query"]).read_bytes() == (tmp_path / "source" / TASK / "imagesTr" /
                                                  f"{DEMO_QUERY}.nii.gz").read_bytes()
    assert not (cache_data() / TASK / "imagesTr" / f"._{DEMO_QUERY}.nii.gz").exists()
    archive.unlink()  # a second request reads the cache: no download, so no archive needed
    assert [e["event"] for e in run_in_process(protocol.ExampleData(id="e4"))] == ["progress", "progress", "example"]


def test_a_download_with_the_wrong_checksum_is_not_kept(tmp_path, monkeypatch):
    archive, md5 = msd_tar(tmp_path)
    monkeypatch.setattr(example_data, "MSD_HIPPOCAMPUS_URL", archive.as_uri())
    monkeypatch.setattr(example_data, "MSD_HIPPOCAMPUS_MD5", "0" * 32)
    events = run_in_process(protocol.ExampleData(id="e5"))
    assert events[-1]["event"] == "error" and events[-1]["id"] == "e5"
    assert events[-1]["message"].startswith("the download arrived damaged or changed")
    assert md5 not in events[-1]["message"] and not list(cache_data().rglob("*.nii.gz"))
    assert not list(cache_data().glob("*.tar"))


def test_a_cache_without_the_demo_pair_names_the_missing_case():
    task = write_task(cache_data())
    (task / "labelsTr" / f"{DEMO_SUPPORT}.nii.gz").unlink()
    events = run_in_process(protocol.ExampleData(id="e6"))
    assert events[-1]["event"] == "error" and DEMO_SUPPORT in events[-1]["message"]
