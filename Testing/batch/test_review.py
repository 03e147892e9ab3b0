"""Reviewing a cohort: the queue's order, decisions written into the folder under its lock and surviving a
kill, reviewed cases never redone, and a grown support set or library redoing only unreviewed cases.
Real batch runs (registration: no model), real files, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from phantoms import phantom
from SAM2FewShotLib.batch.conditioning import conditioning_of
from SAM2FewShotLib.batch.lock import FolderLock
from SAM2FewShotLib.batch.manifest import LOCK
from SAM2FewShotLib.batch.review import case_files, need_score, record_review, review_queue
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.common.digests import file_digest
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume
from SAM2FewShotLib.library.cases import write_list_file
from SAM2FewShotLib.run.request import Request

SHAPE = (8, 32, 32)


@pytest.fixture
def cohort(tmp_path):
    """Three queries (one blank: it fails), two labelled support cases; the first batch run done."""
    for n, name in enumerate(("a", "b")):
        image, _ = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=40 + n)
        write_volume(image, tmp_path / f"{name}.nrrd")
    write_volume(image.with_array(np.zeros_like(image.array)), tmp_path / "blank.nrrd")
    for n in (1, 2):
        support, labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=n)
        write_volume(support, tmp_path / f"s{n}.nrrd")
        write_labels(labels, tmp_path / f"s{n}_label.nii.gz")
    rows = "".join(f"{tmp_path / n}.nrrd,{n}\n" for n in ("a", "b", "blank"))
    (tmp_path / "list.csv").write_text("query,id\n" + rows)
    return tmp_path


def _batch(root: Path, *supports: int) -> list[str]:
    pairs = [a for n in supports for a in ("--support", str(root / f"s{n}.nrrd"), str(root / f"s{n}_label.nii.gz"))]
    return ["batch", "--queries", str(root / "list.csv"), "--out", str(root / "out"), "--method", "registration",
            *pairs, "-q"]


def _manifest(root: Path) -> dict:
    return json.loads((root / "out" / "manifest.json").read_text())["cases"]


def test_the_queue_puts_failed_first_then_by_need_then_reviewed(cohort, capsys):
    assert main(_batch(cohort, 1)) == 1  # the blank case fails
    rows = review_queue(cohort / "out")
    assert [r.status for r in rows] == ["failed", "to review", "to review"]
    assert rows[0].case == "blank" and "nothing to segment" in rows[0].error
    assert rows[1].score >= rows[2].score
    record_review(cohort / "out", rows[1].case, "accepted")
    rows_after = review_queue(cohort / "out")
    assert rows_after[-1].case == rows[1].case and rows_after[-1].status == "accepted"
    capsys.readouterr()
    assert main(["review", str(cohort / "out")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("blank") and "accepted" in printed[-1]


def test_the_need_score_adds_flagged_share_doubt_and_volume_off_the_median():
    medians = {"liver": 100.0}
    calm = {"slices": 10, "low_confidence_slices": 0, "mean_object_score": 8.0, "volume_ml": {"liver": 100.0}}
    unsure = {**calm, "low_confidence_slices": 5, "mean_object_score": 0.0}
    off = {**calm, "volume_ml": {"liver": 400.0}}
    missing = {**calm, "volume_ml": {}}
    assert need_score(calm, medians)[0] == pytest.approx(1 / (1 + np.exp(8.0)), abs=1e-4)
    assert need_score(unsure, medians)[0] == pytest.approx(0.5 + 0.5, abs=1e-3)
    assert need_score(off, medians)[0] == pytest.approx(need_score(calm, medians)[0] + 1.0, abs=1e-3)
    assert need_score(missing, medians)[1] == ("liver volume off the cohort median",)


def test_decisions_are_kept_beside_the_result_and_reviewed_cases_are_never_redone(cohort, capsys):
    assert main(_batch(cohort, 1)) == 1
    out = cohort / "out"
    files = case_files(out, "a")
    original = {p: file_digest(p) for p in (files.result, files.report)}
    result = read_labels(files.result)
    fixed = result.with_array(np.where(result.volume.array > 0, 0, result.volume.array))
    fixed.volume.array[4, 10:20, 10:20] = 1
    write_labels(fixed, cohort / "mine.nii.gz")
    assert main(["review", str(out), "--correct", "a", str(cohort / "mine.nii.gz"), "--reviewer", "dr x"]) == 0
    assert main(["review", str(out), "--reject", "b"]) == 0
    record = _manifest(cohort)["a"]
    assert record["review"]["decision"] == "corrected" and record["review"]["reviewer"] == "dr x"
    [(name, (size, digest))] = [(n, s) for n, s in record["review"]["files"].items() if not n.endswith(".json")]
    assert name == "corrected/a.nii.gz" and file_digest(out / name) == digest and (out / name).stat().st_size == size
    assert np.array_equal(read_labels(out / name).volume.array, fixed.volume.array)
    assert {p: file_digest(p) for p in original} == original, "the original result is kept as it was"
    assert case_files(out, "a").corrected == out / name
    capsys.readouterr()
    assert main([*_batch(cohort, 1), "--force", "--retry-failed"]) == 1
    assert main(_batch(cohort, 1)) == 1
    assert "0 run now" in capsys.readouterr().out
    assert _manifest(cohort)["a"]["review"]["decision"] == "corrected"


def test_a_review_is_refused_while_a_batch_run_holds_the_folder(cohort, capsys):
    assert main(_batch(cohort, 1)) == 1
    capsys.readouterr()
    with FolderLock(cohort / "out", LOCK):
        assert main(["review", str(cohort / "out"), "--accept", "a"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "in use by a batch run" in line
    assert "review" not in _manifest(cohort)["a"]


def test_a_review_killed_at_any_moment_leaves_a_readable_manifest_and_whole_files(cohort):
    assert main(_batch(cohort, 1)) == 1
    out = cohort / "out"
    write_labels(read_labels(case_files(out, "a").result), cohort / "mine.nii.gz")
    argv = [sys.executable, "-m", "SAM2FewShotLib.cli", "review", str(out), "--correct", "a",
            str(cohort / "mine.nii.gz")]
    for delay in np.linspace(0.2, 2.0, 8):
        run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        record = _manifest(cohort)["a"]  # always valid JSON: written beside its place, then renamed
        for name, (size, digest) in record.get("review", {}).get("files", {}).items():
            assert (out / name).stat().st_size == size and file_digest(out / name) == digest
    assert main(["review", str(out), "--correct", "a", str(cohort / "mine.nii.gz")]) == 0  # a stale lock is taken over


def test_a_grown_support_set_redoes_only_unreviewed_cases_and_another_one_is_other_options(cohort, capsys):
    assert main(_batch(cohort, 1)) == 1
    record_review(cohort / "out", "a", "accepted")
    before = _manifest(cohort)
    capsys.readouterr()
    assert main(_batch(cohort, 1, 2)) == 1
    printed = capsys.readouterr().out
    assert "support set grew: 1 unreviewed case(s) to redo" in printed and "1 run now" in printed
    after = _manifest(cohort)
    assert after["a"] == before["a"], "a reviewed case is never touched"
    assert after["b"]["conditioning"] != before["b"]["conditioning"]
    assert main(_batch(cohort, 2)) == 2  # not a grown set: another one
    assert "other options" in capsys.readouterr().err


def test_a_library_that_gained_a_case_has_grown(cohort):
    lib = cohort / "lib"
    lib.mkdir()
    one = write_list_file([(cohort / "s1.nrrd", cohort / "s1_label.nii.gz")], lib)
    before = conditioning_of(Request("retrieval", str(cohort / "a.nrrd"), library=str(one)))
    write_list_file([(cohort / f"s{n}.nrrd", cohort / f"s{n}_label.nii.gz") for n in (1, 2)], lib)
    after = conditioning_of(Request("retrieval", str(cohort / "a.nrrd"), library=str(one)))
    assert after.kind == "library" and after.digest != before.digest
    assert after.grew_from([list(m) for m in before.members]) and not before.grew_from([list(m) for m in after.members])
