"""A structure of the support that the query lacks (a support's tumour, a removed organ): the report
says "not found" per structure with SAM2's best object score, and nothing of it is written.

The model has random weights here, so which structure SAM2 scores lower is not meaningful; what is
tested is the rule on real SAM2 output: a structure's status follows the voxels written, its best
score and slice are SAM2's, a threshold erases every slice at or below it, and the panel says it.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from phantoms import phantom
from SAM2FewShotLib.io.volume import voxel_counts
from SAM2FewShotLib.methods.matched_support import FewShotParams, segment_fewshot
from SAM2FewShotLib.methods.registration import registration_segment
from SAM2FewShotLib.sam2.session import VolumeSession
from SAM2FewShotLib.slicer.panel import not_found_message

FAST = dict(features="intensity", augmentations=1, slices_per_structure=2, top_k=1, scheme="video+memory")


@pytest.fixture(scope="module")
def cut_out():
    """A query with structure 2 cut out (its voxels made background, as after a resection), a support with both."""
    query, truth = phantom(seed=1)
    array = query.array.copy()
    gone = truth.volume.array == 2
    array[gone] = np.median(array[truth.volume.array == 0])
    support = phantom(seed=2, shape_kji=(14, 44, 40))
    return query.with_array(array), support


def scores_of(report: dict, name: str) -> np.ndarray:
    return np.array([np.nan if s["objects"][name]["object_score"] is None else s["objects"][name]["object_score"]
                     for s in report["slices"]])


def test_every_support_structure_is_reported_found_or_not_with_its_best_score(small_predictor, cut_out):
    query, support = cut_out
    labels, report = segment_fewshot(VolumeSession(small_predictor, query), [support], FewShotParams(**FAST))
    counts = voxel_counts(labels.volume.array, 2)
    assert [(s["value"], s["name"]) for s in report["structures"]] == [(1, "structure_1"), (2, "structure_2")]
    for entry in report["structures"]:
        scores = scores_of(report, entry["name"])
        assert entry["voxels"] == counts[entry["value"]]
        assert entry["status"] == ("found" if counts[entry["value"]] else "not found")
        assert scores[entry["best_slice"]] == np.nanmax(scores)  # the best (reported scores are rounded: ties)
        assert entry["best_object_score"] == pytest.approx(np.nanmax(scores), abs=1e-4)
        on = [t for t in range(len(scores)) if np.any(np.take(labels.volume.array, t, axis=0) == entry["value"])]
        assert entry["slices"] == len(on)


def test_a_threshold_keeps_only_the_slices_sam2_is_surer_of(small_predictor, cut_out, caplog):
    query, support = cut_out
    session = VolumeSession(small_predictor, query)
    _, plain = segment_fewshot(session, [support], FewShotParams(**FAST))
    scores = np.concatenate([scores_of(plain, s["name"]) for s in plain["structures"]])
    middle = float(np.nanmedian(scores))  # some slices of some structure are erased, others kept
    labels, report = segment_fewshot(session, [support], FewShotParams(min_object_score=middle, **FAST))
    assert report["fewshot"]["min_object_score"] == middle
    for entry in report["structures"]:
        kept = [t for t in range(labels.volume.array.shape[0]) if np.any(labels.volume.array[t] == entry["value"])]
        # kept where the score is above the threshold; the report rounds scores to 4 decimals, as the threshold is
        assert all(scores_of(report, entry["name"])[t] >= middle for t in kept)

    above = max(s["best_object_score"] for s in plain["structures"]) + 0.01  # above every score: nothing found
    with caplog.at_level(logging.WARNING):
        labels, report = segment_fewshot(session, [support], FewShotParams(min_object_score=above, **FAST))
    assert not np.any(labels.volume.array) and [s["status"] for s in report["structures"]] == ["not found"] * 2
    for name in ("structure_1", "structure_2"):
        assert f"{name}: not found in the query (best object score" in caplog.text
    message = not_found_message(report)
    assert message.startswith(" Not found in this volume: structure_1 (best object score ")
    assert "structure_2 (best object score" in message


def test_registration_reports_each_structure_and_cannot_tell_absence(cut_out):
    """Registration carries every structure of the support over: it reports each as found with the
    support's similarity (it has no object score), and the panel says nothing is missing."""
    query, support = cut_out
    labels, report = registration_segment(query, [support])
    counts = voxel_counts(labels.volume.array, 2)
    assert [(s["name"], s["status"], s["voxels"]) for s in report["structures"]] == \
        [("structure_1", "found", counts[1]), ("structure_2", "found", counts[2])]
    assert report["structures"][0]["best_similarity"] == report["supports"][0]["similarity"]
    assert not_found_message(report) == ""
