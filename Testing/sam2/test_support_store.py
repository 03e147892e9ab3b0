"""Support features encoded once: shared by every query of a runner, saved in the user cache, read back
bit-identical by later runs, a damaged file encoded again, the folder kept to its budget.
Real sam2.1 tiny architecture (random weights, 128 px), real files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from phantoms import phantom
from SAM2FewShotLib.io.volume_io import write_labels, write_volume
from SAM2FewShotLib.run.request import Request
from SAM2FewShotLib.run.runner import Runner, support_features_folder
from SAM2FewShotLib.sam2.build import ModelOptions
from SAM2FewShotLib.sam2.feature_cache import FeatureCache
from SAM2FewShotLib.sam2.feature_files import FeatureFileError
from SAM2FewShotLib.sam2.frames import FrameSource
from SAM2FewShotLib.sam2.support_store import SupportFeatureStore

MODEL = ModelOptions(random_weights=True, image_size=128, device="cpu", threads=1)  # runs compare bit for bit
PARAMS = {"augmentations": 2, "slices_per_structure": 2, "top_k": 1, "scheme": "pair"}
SLICES = 8


@pytest.fixture
def cohort(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM2FEWSHOT_CACHE", str(tmp_path / "cache"))
    files = {}
    for n in range(2):
        image, _ = phantom((SLICES, 32, 32), spacing=(1.0, 1.0, 3.0), seed=10 + n)
        write_volume(image, tmp_path / f"q{n}.nrrd")
        files[f"q{n}"] = str(tmp_path / f"q{n}.nrrd")
    support, labels = phantom((SLICES, 32, 32), spacing=(1.0, 1.0, 3.0), seed=1)
    write_volume(support, tmp_path / "s.nrrd")
    write_labels(labels, tmp_path / "s_label.nii.gz")
    files["support"] = (str(tmp_path / "s.nrrd"), str(tmp_path / "s_label.nii.gz"))
    return files


def _request(files, query):
    return Request(method="matched-support", query=files[query], supports=(files["support"],), model=MODEL,
                   params=PARAMS)


def test_a_saved_set_reads_back_bit_identical_and_encodes_nothing(random_predictor, tmp_path):
    frames = FrameSource(torch.rand(6, 24, 20), random_predictor.image_size)
    first = FeatureCache(random_predictor, frames, random_predictor.device, batch_size=2, max_bytes=1)
    first.embed_all()  # a one-byte window: most frames offloaded to the scratch file first
    assert first.complete and first.save(tmp_path / "set.features")
    again = FeatureCache(random_predictor, frames, random_predictor.device, batch_size=2, max_bytes=1)
    again.restore(tmp_path / "set.features")
    assert again.encoded_frames == 0 and again.complete
    for i in range(6):
        a, b = first.get(i), again.get(i)
        assert all(torch.equal(x, y) for x, y in zip(a["backbone_fpn"], b["backbone_fpn"], strict=True))
        assert all(torch.equal(x, y) for x, y in zip(a["vision_pos_enc"], b["vision_pos_enc"], strict=True))
        assert torch.equal(first.embeddings[i], again.embeddings[i])
    assert again.encoded_frames == 0
    other = FeatureCache(random_predictor, FrameSource(torch.rand(5, 24, 20), 256), random_predictor.device)
    with pytest.raises(FeatureFileError, match="5"):
        other.restore(tmp_path / "set.features")  # another number of frames: refused, not misread
    (tmp_path / "set.features").write_bytes((tmp_path / "set.features").read_bytes()[:-10])
    with pytest.raises(FeatureFileError, match="bytes"):
        again.restore(tmp_path / "set.features")


def test_supports_are_encoded_once_per_runner_and_once_across_runs(cohort):
    runner = Runner()
    _, first = runner.run(_request(cohort, "q0"))
    warm, second = runner.run(_request(cohort, "q1"))  # another query, the same supports and slice size
    support_frames = first["fewshot"]["support_entries"]
    assert first["timing"]["frames_encoded"] == SLICES + support_frames
    assert second["timing"]["frames_encoded"] == SLICES  # the supports were not encoded again
    runner.close()  # saves the complete set
    saved = list(support_features_folder().glob("*.features"))
    assert len(saved) == 1
    later = Runner()  # a later run of the CLI, or a batch resumed
    restored, third = later.run(_request(cohort, "q1"))
    assert third["timing"]["frames_encoded"] == SLICES and later._supports.restored == 1
    cold, fourth = Runner(save_support_features=False).run(_request(cohort, "q1"))
    assert fourth["timing"]["frames_encoded"] == SLICES + support_frames  # nothing saved is read either
    later.close()
    # One result whatever the supports' features came from (kept in memory after another query, read
    # back from the cache, encoded with this query): bit for bit, the labels and SAM2's object scores.
    for labels, report in ((restored, third), (cold, fourth)):
        assert np.array_equal(labels.volume.array, warm.volume.array)
        assert _scores(report) == _scores(second)


def _scores(report: dict) -> list:
    return [{k: v.get("object_score") for k, v in s.get("objects", {}).items()} for s in report["slices"]]


def test_a_damaged_saved_set_is_encoded_again_and_replaced(cohort, caplog):
    runner = Runner()
    labels, report = runner.run(_request(cohort, "q0"))
    runner.close()
    [saved] = support_features_folder().glob("*.features")
    saved.write_bytes(b"SAM2FewShot-features-1\n" + b"\0" * 20)
    with caplog.at_level(logging.WARNING):
        again, report2 = Runner().run(_request(cohort, "q0"))
    assert "could not be read" in caplog.text
    assert report2["timing"]["frames_encoded"] == report["timing"]["frames_encoded"]
    assert np.array_equal(again.volume.array, labels.volume.array)  # the same result from re-encoded features


def test_the_folder_keeps_to_its_budget(random_predictor, tmp_path):
    store = SupportFeatureStore(random_predictor, folder=tmp_path, keep=1, disk_budget=1)
    for n in range(3):
        store.cache(f"set{n}", FrameSource(torch.rand(2, 16, 16), 256)).embed_all()
    store.close()
    assert len(list(tmp_path.glob("*.features"))) == 1  # over budget: the newest alone stays
