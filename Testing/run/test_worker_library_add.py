"""A case added to a library through the background worker (the Slicer panel's *Add to library*): a real
worker process, real files, and an indexed library whose index the worker brings up to date by embedding
only the new case with the SAM2 model it loads (the real sam2.1 tiny architecture, random weights)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from phantoms import REPO, phantom
from SAM2FewShotLib.io.volume_io import write_labels, write_volume
from SAM2FewShotLib.library.cases import open_library
from SAM2FewShotLib.run.client import WorkerClient, WorkerError
from SAM2FewShotLib.run.protocol import LibraryAdd, ModelOptions, ProtocolError, encode, parse_request

MODEL = ModelOptions(random_weights=True, image_size=256, device="cpu", seed=0)
SHAPE = (8, 32, 32)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread: this machine's 2 cores are shared


@pytest.fixture(scope="module")
def client():
    with WorkerClient(python=sys.executable, pythonpath=[REPO / "SAM2FewShot"], env=ENV) as worker:
        yield worker


def _case(folder, name: str, seed: int):
    image, labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    return write_volume(image, folder / f"{name}.nrrd"), write_labels(labels, folder / f"{name}.seg.nrrd")


def _add(client, library, image, labels, name, **extra) -> dict:
    job = LibraryAdd(id=f"add-{name}", library=str(library), image=str(image), labels=str(labels), name=name,
                     model=MODEL, **extra)
    return client.wait(client.submit(job), timeout=600)


def test_a_case_starts_a_new_library_and_no_model_is_loaded_for_it(client, tmp_path):
    image, labels = _case(tmp_path / "reviewed", "case7", seed=7)
    event = _add(client, tmp_path / "library", image, labels, "case7")
    assert event["event"] == "added" and event["case"] == "case7"
    assert "no index yet" in event["message"]
    [case] = open_library(tmp_path / "library").cases
    assert case.labels == tmp_path / "library" / "case7.seg.nrrd" and case.image.name == "case7.nrrd"


def test_an_indexed_library_gets_only_the_new_case_embedded_in_the_worker(client, tmp_path):
    from SAM2FewShotLib.library.index import EmbeddingIndex
    from SAM2FewShotLib.library.sync import library_features, sync_library
    from SAM2FewShotLib.sam2.build import load_model

    library = tmp_path / "library"
    for n in (1, 2):
        _case(library, f"c{n}", seed=n)
    predictor, _ = load_model(MODEL)
    index, _, stats = sync_library(open_library(library), library_features("sam2", predictor, "cpu"), "axial")
    assert stats.embedded == 2
    image, labels = _case(tmp_path / "reviewed", "new", seed=9)
    event = _add(client, library, image, labels, "new")
    assert "1 index updated" in event["message"], event
    cases = open_library(library).cases
    [described] = [ix.describe(cases) for ix in EmbeddingIndex.existing(open_library(library).index_root())]
    assert (described["cases_indexed"], described["current"], described["new"]) == (3, 3, 0)


def test_an_unusable_case_is_one_error_line_and_nothing_is_written(client, tmp_path):
    image, _ = _case(tmp_path / "reviewed", "a", seed=3)
    _, labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=3)
    empty = labels.with_array(np.zeros_like(labels.volume.array))
    wrong = write_labels(empty, tmp_path / "reviewed" / "wrong.seg.nrrd")
    with pytest.raises(WorkerError) as caught:
        _add(client, tmp_path / "library", image, wrong, "a")
    assert "\n" not in str(caught.value) and "wrong.seg.nrrd" in str(caught.value)
    assert not (tmp_path / "library").exists()
    assert client.is_alive  # the worker goes on


def test_a_library_add_request_round_trips_and_refuses_relative_paths():
    job = LibraryAdd(id="a1", library="/lib", image="/x/a.nrrd", labels="/x/a.seg.nrrd", name="a", model=MODEL)
    assert parse_request(encode(job.to_message())) == job
    with pytest.raises(ProtocolError, match="absolute"):
        parse_request(encode({**job.to_message(), "image": "a.nrrd"}))
    with pytest.raises(ProtocolError, match="unknown key"):
        parse_request(encode({**job.to_message(), "extra": 1}))
    assert job.model.image_size == 256
