"""The cohort's parts on their own, no model: finding the cases, the manifest's record of them, the compute a
run pins and compares, and the cohort report's rows. Real files; the end-to-end runs are test_batch.py."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from phantoms import phantom
from SAM2FewShotLib.batch import cohort_report, compute, manifest
from SAM2FewShotLib.batch.cohort import Case, case_id, find_cases
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.run.request import Request
from SAM2FewShotLib.sam2.build import ModelOptions


def test_cases_come_from_a_folder_or_a_csv_with_their_ids(tmp_path):
    for name in ("b_img.nii.gz", "a.nrrd", "a_label.nii.gz", "notes.txt", ".hidden.nrrd"):
        (tmp_path / name).write_bytes(b"x")
    assert [(c.id, c.query.name) for c in find_cases(tmp_path)] == [("a", "a.nrrd"), ("b", "b_img.nii.gz")]
    assert case_id(tmp_path / "hippocampus_015_img.nii.gz") == "hippocampus_015"
    listing = tmp_path / "cohort.csv"
    listing.write_text("query,id,labels\na.nrrd,first,a_label.nii.gz\nb_img.nii.gz,,\n")
    cases = find_cases(listing)
    assert [(c.id, c.query, c.truth) for c in cases] == [("first", tmp_path / "a.nrrd", tmp_path / "a_label.nii.gz"),
                                                        ("b", tmp_path / "b_img.nii.gz", None)]
    listing.write_text("query,id,colour\na.nrrd,x,red\n")
    with pytest.raises(InputError, match="unknown column"):
        find_cases(listing)
    listing.write_text("query,id\na.nrrd,same\nb_img.nii.gz,same\n")
    with pytest.raises(InputError, match="two cases would write the same outputs: same"):
        find_cases(listing)


def test_the_options_digest_leaves_out_the_compute_and_the_manifest_checks_outputs(tmp_path):
    template = Request("matched-support", "q.nrrd", supports=((str(tmp_path / "s"), str(tmp_path / "l")),))
    pinned = dataclasses.replace(template, model=ModelOptions(threads=7, precision="bf16"))
    assert manifest.options_digest(template) == manifest.options_digest(pinned)  # compared apart, per case
    other = dataclasses.replace(template, params={"top_k": 1})
    assert manifest.options_digest(other) != manifest.options_digest(template)
    query = tmp_path / "q.nrrd"
    query.write_bytes(b"volume")
    case = Case("q", query)
    out = tmp_path / "q.nii.gz"
    out.write_bytes(b"labels")
    record = {"status": "done", "options": "o", "input": manifest.input_stamp(case),
              "files": manifest.files_record(tmp_path, [out])}
    book = manifest.Manifest(tmp_path, {"q": record})
    assert book.status(case, "o") == "done" and book.status(case, "p") == "other options"
    out.write_bytes(b"label")  # damaged: done again
    assert book.status(case, "o") == "todo"
    book.save()
    assert json.loads((tmp_path / manifest.MANIFEST).read_text())["format"] == manifest.FORMAT
    (tmp_path / manifest.MANIFEST).write_text("{")
    with pytest.raises(InputError, match="not a cohort manifest"):
        manifest.Manifest.open(tmp_path)


def test_what_ran_is_recorded_compared_and_said_in_one_line(caplog):
    here = compute.Compute("fp32", 2, "cpu")
    template = compute.pinned(Request("propagate", "q.nrrd"), here)
    assert (template.model.precision, template.model.threads) == ("fp32", 2)
    report = {"model": {"name": "sam2.1-tiny", "precision": "bf16", "threads": 1, "device": "cpu"}}
    assert compute.ran_with(report) == {"precision": "bf16", "threads": 1, "device": "cpu"}
    assert compute.ran_with({"model": {"name": None}}) is None  # registration: no model
    records = {"a": {"status": "done", "compute": {"precision": "bf16", "threads": 1}},
               "b": {"status": "done", "compute": {"precision": "fp32", "threads": 1}},
               "c": {"status": "failed", "compute": {"precision": "bf16", "threads": 1}},
               "d": {"status": "done"}}  # recorded before compute was: not compared
    assert compute.other_precision(records, here) == {"a": "bf16"}
    with pytest.raises(InputError) as refused:
        compute.refuse_mixed_precision({"a": "bf16"}, here, "out")
    text = str(refused.value)
    assert "1 case(s) in out ran in bf16" in text and "--precision bf16" in text and "--mixed-precision" in text
    with caplog.at_level(logging.WARNING):
        compute.say_other_threads(records, here, "out")
        compute.say_other_threads({"b": {"status": "done", "compute": {"threads": 2}}}, here, "out")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "2 case(s) in out ran with 1 torch thread(s) and this run uses 2" in said[0]
    actors = compute.actor_compute(ModelOptions(precision="fp32"), gpus=0)
    assert actors == compute.Compute("fp32", 1, "cpu")  # one thread per one-CPU actor
    assert compute.actor_compute(ModelOptions(), gpus=1).precision == "bf16"  # CUDA's default


def test_the_cohort_report_has_a_row_per_case_and_its_means(tmp_path):
    cases = [Case("a", tmp_path / "a.nrrd"), Case("b", tmp_path / "b.nrrd"), Case("c", tmp_path / "c.nrrd")]
    records = {"a": {"status": "done", "seconds": 2.0, "slices": 8, "volume_ml": {"liver": 1.5},
                     "scores": {"liver": {"dice": 0.8, "hd95_mm": 3.0}}, "attempts": 1},
               "b": {"status": "failed", "error": "no | pipe\nhere", "attempts": 2}}
    header, rows = cohort_report.cohort_rows(cases, records)
    assert [r["status"] for r in rows] == ["done", "failed", "not run"]
    assert {"volume_ml:liver", "dice:liver", "hd95_mm:liver"} <= set(header)
    totals = cohort_report.summary(header, rows, wall_s=3600.0)
    assert (totals["done"], totals["failed"], totals["not_run"], totals["cases_per_hour"]) == (1, 1, 1, 1.0)
    assert totals["mean dice:liver"] == 0.8
    text = cohort_report.markdown(header, rows, totals)
    assert "1 of 3 cases done, 1 failed, 1 not run." in text and "no \\| pipe here" in text


def test_a_case_counts_the_slices_to_check_once_each_whatever_their_structures():
    from SAM2FewShotLib.batch.case import case_summary

    image, labels = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0))
    doubtful = {"object_score": 0.5, "source": "propagation forward", "voxels": 10}
    report = {"slices": [{"slice": 3, "objects": {"a": doubtful, "b": doubtful}},
                         {"slice": 4, "objects": {"a": {**doubtful, "object_score": 9.0}}},
                         {"slice": 5, "objects": {"b": doubtful}}],
              "session": {"num_slices": 8}}
    summary = case_summary(labels, report, Request("propagate", "q.nrrd"), None)
    assert summary["low_confidence_slices"] == 2  # slices 3 and 5: three flags, two slices
