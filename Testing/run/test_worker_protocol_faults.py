"""Protocol faults of the real worker subprocess (issue 26, item 6): a lone surrogate in a string field, a
relative path, a client that closed its pipe. Each bad job gets one error line and the worker goes on;
a worker nobody reads any more exits quietly. Jobs use the registration method: no model to load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phantoms import write_query_and_support
from SAM2FewShotLib.io.volume_io import read_labels
from SAM2FewShotLib.run.client import WorkerClient, absolute_paths
from SAM2FewShotLib.run.worker import CLIENT_GONE_EXIT

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WORKER = [sys.executable, "-m", "SAM2FewShotLib.run.worker"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("faults")
    write_query_and_support(root, "q.nrrd", "s.nrrd", "s_label.nii.gz")
    return {"root": str(root), "query": str(root / "q.nrrd"), "image": str(root / "s.nrrd"),
            "labels": str(root / "s_label.nii.gz")}


def _job(files: dict, job_id: str, out: Path, **extra) -> dict:
    return {"type": "job", "id": job_id, "method": "registration", "query": files["query"],
            "supports": [[files["image"], files["labels"]]], "out": str(out),
            "report": str(out.with_name(out.name.split(".")[0] + "_report.json")), **extra}


def test_lone_surrogates_and_relative_paths_get_one_error_line_and_the_worker_goes_on(files, tmp_path):
    lines = [
        json.dumps(_job(files, "surrogate", tmp_path / "a.nii.gz", query="\udcff.nrrd")),
        json.dumps(_job(files, "nested", tmp_path / "b.nii.gz", params={"note": ["\ud800"]})),
        json.dumps(_job(files, "\udcffid", tmp_path / "c.nii.gz", query="\udcff.nrrd")),
        json.dumps(_job(files, "relative", Path("relative_out.nii.gz"))),
        json.dumps(_job(files, "relative-support", tmp_path / "d.nii.gz", supports=[["s.nrrd", files["labels"]]])),
        json.dumps(_job(files, "valid", tmp_path / "ok.nii.gz")),
        json.dumps({"type": "shutdown"}),
    ]
    run = subprocess.run(WORKER, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300,
                         env=ENV, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    events = [json.loads(line) for line in run.stdout.splitlines()]  # every line is JSON, surrogates escaped
    answers = [(e["event"], e["id"]) for e in events if e["event"] in ("result", "error")]
    assert answers == [("error", "surrogate"), ("error", "nested"), ("error", "\udcffid"), ("error", "relative"),
                       ("error", "relative-support"), ("result", "valid")]
    messages = {e["id"]: e["message"] for e in events if e["event"] == "error"}
    assert "job.query is not valid text" in messages["surrogate"] and "U+DCFF" in messages["surrogate"]
    assert "job.params.note[0]" in messages["nested"]
    assert "job.out must be an absolute path" in messages["relative"]
    assert "job.supports[0][0] must be an absolute path" in messages["relative-support"]
    assert not (tmp_path / "relative_out.nii.gz").exists()
    assert "Traceback" not in run.stderr
    assert read_labels(tmp_path / "ok.nii.gz").volume.array.any()


def test_a_worker_whose_client_closed_its_pipe_exits_quietly(files, tmp_path):
    proc = subprocess.Popen(WORKER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV, cwd=tmp_path)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "ready"
        proc.stdout.close()  # the client is gone: the next event finds no reader
        job = _job(files, "orphan", tmp_path / "o.nii.gz", query=str(tmp_path / "missing.nrrd"))
        proc.stdin.write((json.dumps(job) + "\n").encode())
        proc.stdin.flush()
        code = proc.wait(timeout=120)
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == CLIENT_GONE_EXIT, stderr[-2000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "BrokenPipe" not in stderr


def test_the_client_sends_absolute_paths_whatever_the_workers_folder(files, tmp_path, monkeypatch):
    monkeypatch.chdir(files["root"])
    elsewhere = tmp_path / "worker_cwd"
    elsewhere.mkdir()
    job = {"method": "registration", "query": "q.nrrd", "supports": [["s.nrrd", "s_label.nii.gz"]],
           "out": "client_out.nii.gz", "report": "client_report.json"}
    with WorkerClient(env=ENV, cwd=elsewhere) as client:
        result = client.wait(client.submit(job), timeout=300)
    assert result["labels"] == str(Path(files["root"]) / "client_out.nii.gz")
    assert (Path(files["root"]) / "client_out.nii.gz").is_file() and not any(elsewhere.iterdir())


def test_absolute_paths_leaves_absolute_ones_and_other_fields_alone():
    message = {"type": "job", "id": "x", "query": "/data/q.nrrd", "out": "o.nii.gz", "params": {"out": "keep"},
               "supports": [["s.nrrd", "/abs/l.nii.gz"]], "library": None}
    done = absolute_paths(message)
    assert done["query"] == "/data/q.nrrd" and done["out"] == os.path.abspath("o.nii.gz")
    assert done["supports"] == [[os.path.abspath("s.nrrd"), "/abs/l.nii.gz"]]
    assert done["params"] == {"out": "keep"} and done["library"] is None and message["out"] == "o.nii.gz"
