"""Cohort runs: `sam2fewshot batch` on one machine and on a real local Ray cluster (2 CPUs), with the real
SAM2 architecture (random weights, 128 px), real files, real subprocesses and signals.

One torch thread everywhere (--threads 1): a result is bit-identical across runs at one thread count and
precision (batch/compute.py), and a Ray actor with one CPU runs on one thread.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from phantoms import phantom
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume

SHAPE = (8, 32, 32)
FAST = ["--random-weights", "--image-size", "128", "--device", "cpu", "--augmentations", "1",
        "--slices-per-structure", "2", "--top-k", "1", "--scheme", "pair", "--threads", "1"]
CASES = ["case_a", "case_b", "case_c", "case_d"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SAM2FEWSHOT_CACHE", str(tmp_path / "cache"))  # no support features from other tests
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def cohort(tmp_path):
    """Four query volumes with their ground truth, and a labelled support case."""
    queries, truth = tmp_path / "queries", tmp_path / "truth"
    queries.mkdir()
    truth.mkdir()
    for n, name in enumerate(CASES):
        image, labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=20 + n)
        write_volume(image, queries / f"{name}.nrrd")
        write_labels(labels, truth / f"{name}_label.nii.gz")
    support, labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=1)
    write_volume(support, tmp_path / "support.nrrd")
    write_labels(labels, tmp_path / "support_label.nii.gz")
    return {"queries": queries, "truth": truth, "support": [str(tmp_path / "support.nrrd"),
                                                           str(tmp_path / "support_label.nii.gz")],
            "root": tmp_path}


def _batch(cohort, out: Path, *extra) -> list[str]:
    return ["batch", "--queries", str(cohort["queries"]), "--out", str(out), "--support", *cohort["support"],
            *FAST, "-q", *map(str, extra)]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["cases"]


def _arrays(out: Path) -> dict:
    return {name: read_labels(out / f"{name}.nii.gz").volume.array for name in CASES}


def test_a_cohort_gives_what_one_segment_call_per_case_gives(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_batch(cohort, out, "--labels", cohort["truth"])) == 0, capsys.readouterr().err
    batch = _arrays(out)
    for name in CASES:
        single = tmp_path / f"single_{name}.nii.gz"
        assert main(["segment", "--query", str(cohort["queries"] / f"{name}.nrrd"), "--support", *cohort["support"],
                     *FAST, "--out", str(single), "-q"]) == 0
        assert np.array_equal(read_labels(single).volume.array, batch[name]), name
    manifest = _manifest(out)
    assert all(manifest[n]["status"] == "done" and set(manifest[n]["scores"]) == {"structure_1", "structure_2"}
               for n in CASES)
    reports = [json.loads((out / f"{n}_report.json").read_text()) for n in CASES]
    supports = reports[0]["fewshot"]["support_entries"]
    assert reports[0]["timing"]["frames_encoded"] == SHAPE[0] + supports
    assert all(r["timing"]["frames_encoded"] == SHAPE[0] for r in reports[1:])  # supports encoded once
    assert all(r["run"]["session_reused"] for r in reports[1:])  # each next query was read ahead
    rows = list(csv.DictReader((out / "cohort.csv").open()))
    assert [r["case"] for r in rows] == CASES and all(r["status"] == "done" for r in rows)
    assert all(float(r["volume_ml:structure_1"]) > 0 and 0 <= float(r["dice:structure_1"]) <= 1 for r in rows)
    assert "4 of 4 cases done" in (out / "cohort.md").read_text()
    assert (out / "cohort.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stopped_cohort_resumes_with_the_cases_left(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "SAM2FewShotLib.cli", *_batch(cohort, out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and run.poll() is None:
        if (out / "manifest.json").exists() and len(_manifest(out)) >= 2:
            break
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    before = {n: (out / f"{n}_report.json").stat().st_mtime_ns for n in CASES if (out / f"{n}_report.json").exists()}
    recorded = set(_manifest(out))
    assert 2 <= len(recorded) < 4, "the cohort was stopped midway"
    assert main(_batch(cohort, out)) == 0, capsys.readouterr().err
    manifest = _manifest(out)
    assert all(manifest[n]["status"] == "done" for n in CASES)
    for name, mtime in before.items():  # finished cases were not computed (or written) again
        assert (out / f"{name}_report.json").stat().st_mtime_ns == mtime, name
    assert f"{4 - len(before)} run now" in capsys.readouterr().out


def test_a_damaged_output_is_done_again(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_batch(cohort, out)) == 0
    good = _arrays(out)
    data = (out / "case_b.nii.gz").read_bytes()
    (out / "case_b.nii.gz").write_bytes(data[: len(data) // 2])  # half a file
    others = {n: (out / f"{n}_report.json").stat().st_mtime_ns for n in CASES if n != "case_b"}
    capsys.readouterr()
    assert main(_batch(cohort, out)) == 0
    assert "1 run now" in capsys.readouterr().out
    assert all(np.array_equal(a, good[n]) for n, a in _arrays(out).items())
    assert all((out / f"{n}_report.json").stat().st_mtime_ns == t for n, t in others.items())


def test_a_bad_case_is_reported_and_the_rest_finish_then_retried_alone(cohort, tmp_path, capsys):
    image, _ = phantom(SHAPE, spacing=(1.0, 1.0, 3.0))
    write_volume(image.with_array(np.zeros_like(image.array)), tmp_path / "blank.nrrd")
    listing = tmp_path / "cohort.csv"
    rows = [f"{cohort['queries'] / f'{n}.nrrd'},{n}" for n in CASES[:2]] + [f"{tmp_path / 'blank.nrrd'},blank"]
    listing.write_text("query,id\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["batch", "--queries", str(listing), "--out", str(out), "--support", *cohort["support"], *FAST, "-q"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "1 case(s) failed" in err and "blank" in err
    manifest = _manifest(out)
    assert manifest["blank"]["status"] == "failed" and "nothing to segment" in manifest["blank"]["error"]
    assert manifest["case_a"]["status"] == manifest["case_b"]["status"] == "done"
    assert "nothing to segment" in (out / "cohort.md").read_text()
    done = {n: (out / f"{n}_report.json").stat().st_mtime_ns for n in ("case_a", "case_b")}
    assert main(argv) == 1 and "0 run now" in capsys.readouterr().out  # a plain rerun leaves the failure
    assert main([*argv, "--retry-failed"]) == 1 and "1 run now" in capsys.readouterr().out  # only it, again
    write_volume(image, tmp_path / "blank.nrrd")  # the user fixes the file: a changed query is done again
    assert main(argv) == 0 and "1 run now" in capsys.readouterr().out
    assert _manifest(out)["blank"]["status"] == "done"
    assert all((out / f"{n}_report.json").stat().st_mtime_ns == t for n, t in done.items())


def test_other_options_are_refused_unless_forced(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_batch(cohort, out)) == 0
    changed = [a if a != "pair" else "video" for a in _batch(cohort, out)]
    assert main(changed) == 2
    assert "segmented with other options" in capsys.readouterr().err
    assert main([*changed, "--force"]) == 0 and "4 run now" in capsys.readouterr().out


def test_each_case_records_what_ran_and_a_cohort_is_not_mixed_unless_asked(cohort, tmp_path, capsys):
    out, listing = tmp_path / "out", tmp_path / "one.csv"  # one case: bf16 is slow where it is emulated
    listing.write_text(f"query\n{cohort['queries'] / CASES[0]}.nrrd\n")
    first = ["batch", "--queries", str(listing), "--out", str(out), "--support", *cohort["support"], *FAST, "-q"]
    assert main(first) == 0
    manifest = _manifest(out)
    assert all(r["compute"] == {"precision": "fp32", "threads": 1, "device": "cpu"} for r in manifest.values())
    reports = [json.loads((out / f"{n}_report.json").read_text())["model"] for n in CASES[:1]]
    assert all(m["precision"] == "fp32" and m["threads"] == 1 and m["precision_reason"] for m in reports)
    capsys.readouterr()
    assert main([*first, "--threads", "2"]) == 0  # another thread count: said in one line, nothing redone
    out_text, err = capsys.readouterr()
    assert "0 run now" in out_text
    said = [line for line in err.splitlines() if "thread" in line]
    assert len(said) == 1 and "1 case(s)" in said[0] and "--threads 1" in said[0], err
    bf16 = [*first, "--precision", "bf16"]
    assert main(bf16) == 2  # another precision: refused, with the three ways on
    err = capsys.readouterr().err
    assert "ran in fp32" in err and "--mixed-precision" in err and "--force" in err and len(err.splitlines()) == 1
    assert main([*bf16, "--mixed-precision"]) == 0 and "0 run now" in capsys.readouterr().out
    assert main([*bf16, "--force"]) == 0 and "1 run now" in capsys.readouterr().out
    assert all(r["compute"]["precision"] == "bf16" for r in _manifest(out).values())


# --- Ray ---------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("ray")  # one local Ray cluster at a time on the machine (run_tests.sh: --dist loadgroup)
def test_ray_gives_the_local_outputs_and_survives_a_killed_actor(cohort, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="the cluster extra (ray) is not installed")  # here: the tests above run
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "cohort-test-token")  # so that this test can join the cohort's cluster
    slower = ["--image-size", "256"]  # cases long enough that both actors are mid-case when one is killed
    assert main([*_batch(cohort, local), *slower]) == 0
    run = subprocess.Popen([sys.executable, "-m", "SAM2FewShotLib.cli",
                            *_batch(cohort, on_ray, "--ray", "--workers", 2), *slower],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.monotonic() + 240
    try:
        while not ray.is_initialized():  # join the cohort's local cluster as soon as it is up
            try:
                ray.init(address="auto", namespace="sam2fewshot", log_to_driver=False)
            except (ConnectionError, RuntimeError):
                assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-2000:]
                time.sleep(0.2)
        while not ((on_ray / "manifest.json").exists() and _manifest(on_ray)):  # one case done, two running
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("cohort-")]
        ray.kill(ray.get_actor(names[0], namespace="sam2fewshot"))  # as an out-of-memory kill would
    finally:
        ray.shutdown()
    out, err = run.communicate(timeout=240)
    assert run.returncode == 0, err[-3000:]
    manifest = _manifest(on_ray)
    assert sorted(manifest) == CASES and all(r["status"] == "done" for r in manifest.values())
    assert any(r["attempts"] == 2 for r in manifest.values()), "the killed actor's case ran again elsewhere"
    assert sorted(p.name for p in on_ray.glob("case_*")) == sorted(
        f"{n}{s}" for n in CASES for s in (".nii.gz", ".json", "_report.json"))  # every output exactly once
    ray_arrays, local_arrays = _arrays(on_ray), _arrays(local)
    assert all(np.array_equal(ray_arrays[n], local_arrays[n]) for n in CASES)
    assert main([*_batch(cohort, on_ray), *slower]) == 0  # a Ray run resumes locally: nothing left to do
