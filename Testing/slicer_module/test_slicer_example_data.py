"""The panel's *Load example data* headless: Slicer's real MRML (slicer-core), a real worker process, a fake
MSD hippocampus task from phantoms in the cache. What the button does, minus the Qt timer and dialog (the
tests call poll() as the timer would). Nothing is downloaded: every HTTP(S) request goes to a closed port."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mrml_oracle import require_mrml
from phantoms import REPO, phantom
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.example_data import DEMO_QUERY, DEMO_SUPPORT
from SAM2FewShotLib.io.volume_io import read_labels, read_volume, write_volume

slicer = require_mrml()

from SAM2FewShotLib.run.client import WorkerClient  # noqa: E402 - once slicer-core is known to be there
from SAM2FewShotLib.slicer import example_data  # noqa: E402 - once slicer-core is known to be there
from SAM2FewShotLib.slicer.mrml_segments import (  # noqa: E402 - once slicer-core is known to be there
    labels_from_segmentation,
    register_segmentation_converters,
)
from SAM2FewShotLib.slicer.mrml_volume import node_ijk_to_ras, volume_from_node  # noqa: E402
from SAM2FewShotLib.slicer.runs import RunController  # noqa: E402 - once slicer-core is known to be there

ENGINE_PARENT = REPO / "SAM2FewShot"
CLOSED = "http://127.0.0.1:9"  # the discard port: connections are refused at once
NAMES = ["anterior hippocampus", "posterior hippocampus"]


def write_task() -> Path:
    """The demo's two cases in the MSD layout, where a first download leaves them in the cache."""
    task = Path(os.environ["SAM2FEWSHOT_CACHE"]) / "data" / "Task04_Hippocampus"
    for folder in ("imagesTr", "labelsTr"):
        (task / folder).mkdir(parents=True)
    for seed, case in enumerate((DEMO_QUERY, DEMO_SUPPORT)):
        image, labels = phantom((8, 24, 20), spacing=(1.0, 1.2, 1.5), origin=(5.0 * seed, -3.0, 2.0), seed=seed)
        write_volume(image, task / "imagesTr" / f"{case}.nii.gz")
        write_volume(labels.volume, task / "labelsTr" / f"{case}.nii.gz")  # no names, as the MSD's
    labels = {"0": "background", "1": "Anterior", "2": "Posterior"}
    (task / "dataset.json").write_text(json.dumps({"labels": labels}), encoding="utf-8")
    return task


@pytest.fixture
def world():
    """A scene with one volume of the user's, and a run controller whose worker (started on demand, as the
    Logic's) sees this test's cache and no network."""
    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mine")
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update({"OMP_NUM_THREADS": "1", "https_proxy": CLOSED, "HTTPS_PROXY": CLOSED})

    def client():
        return WorkerClient(python=sys.executable, pythonpath=[ENGINE_PARENT], env=env)

    logs: list[str] = []
    controller = RunController(scene, client, on_log=logs.append)
    yield SimpleNamespace(scene=scene, controller=controller, logs=logs)
    controller.shutdown()


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]


def finish(load: example_data.ExampleLoad, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while load.poll():
        assert time.monotonic() < deadline, "the example data did not arrive in time"
        time.sleep(0.05)


def test_the_example_pair_enters_the_scene_as_three_nodes_equal_to_its_files(world):
    task = write_task()
    before = node_ids(world.scene)
    load = example_data.ExampleLoad(world.scene, world.controller, world.logs.append)
    assert world.controller.client is load.client  # the run after it finds this worker warm
    finish(load)
    query_node, support_node, segmentation_node = load.nodes
    assert [n.GetName() for n in load.nodes] == [DEMO_QUERY, DEMO_SUPPORT, f"{DEMO_SUPPORT} segmentation"]
    assert [n.GetClassName() for n in load.nodes] == ["vtkMRMLScalarVolumeNode", "vtkMRMLScalarVolumeNode",
                                                      "vtkMRMLSegmentationNode"]
    assert all(world.scene.GetNodeByID(n.GetID()) is n for n in load.nodes)
    assert node_ids(world.scene)[:len(before)] == before  # the user's nodes untouched
    for node, case in ((query_node, DEMO_QUERY), (support_node, DEMO_SUPPORT)):
        expected = read_volume(task / "imagesTr" / f"{case}.nii.gz")
        np.testing.assert_allclose(node_ijk_to_ras(node), expected.ijk_to_ras(), atol=1e-5)
        np.testing.assert_array_equal(volume_from_node(node).array, expected.array)
    truth = read_labels(task / "labelsTr" / f"{DEMO_SUPPORT}.nii.gz")
    segments = labels_from_segmentation(segmentation_node, volume_from_node(support_node))
    np.testing.assert_array_equal(segments.volume.array, truth.volume.array)
    assert [s.name for s in segments.segments] == NAMES
    np.testing.assert_allclose([s.color for s in segments.segments], [s.color for s in truth.segments], atol=1e-6)
    assert not segmentation_node.GetDisplayNode().GetVisibility()  # the support's labels, not over the query
    assert load.message.startswith(f"Loaded the example: query {DEMO_QUERY}, support {DEMO_SUPPORT}")
    assert ", ".join(NAMES) in load.message and load.poll() is False
    assert any(line.startswith("Background worker ready") for line in world.logs)


def test_offline_it_fails_in_one_sentence_and_the_scene_is_unchanged(world):
    before = node_ids(world.scene)
    load = example_data.ExampleLoad(world.scene, world.controller, world.logs.append)
    finish(load)
    assert load.nodes is None and node_ids(world.scene) == before
    assert load.message.startswith("The example data were not loaded: the download failed (Connection refused)")
    assert "internet connection" in load.message and "\n" not in load.message and "--" not in load.message
    assert world.controller.client.pending == []  # the worker waits for the next request or run


def test_a_run_in_progress_or_a_cancel_loads_nothing(world):
    busy = SimpleNamespace(is_running=True, client=None, client_factory=lambda: pytest.fail("no worker wanted"))
    with pytest.raises(InputError, match="^A segmentation is running"):
        example_data.ExampleLoad(world.scene, busy)
    write_task()
    before = node_ids(world.scene)
    load = example_data.ExampleLoad(world.scene, world.controller)
    load.cancel()
    assert load.poll() is False and load.nodes is None and load.message.startswith("Cancelled")
    world.controller.client.join_reapers(5.0)
    assert not world.controller.client.is_alive and node_ids(world.scene) == before


def test_a_failure_while_adding_removes_every_node_made(world, monkeypatch):
    task = write_task()
    event = {"query": str(task / "imagesTr" / f"{DEMO_QUERY}.nii.gz"),
             "support": str(task / "imagesTr" / f"{DEMO_SUPPORT}.nii.gz"),
             "support_labels": str(task / "labelsTr" / f"{DEMO_SUPPORT}.nii.gz"),
             "query_case": DEMO_QUERY, "support_case": DEMO_SUPPORT, "names": {"1": NAMES[0]}}

    def broken(*args, **kwargs):
        raise RuntimeError("no memory for the labelmap")

    monkeypatch.setattr(example_data, "add_labels_to_segmentation", broken)
    before = node_ids(world.scene)
    with pytest.raises(RuntimeError):
        example_data.add_example_nodes(world.scene, event)
    assert node_ids(world.scene) == before  # volumes, segmentation and their display nodes gone
    with pytest.raises(InputError):  # a file that cannot be read: no node is made at all
        example_data.add_example_nodes(world.scene, {**event, "support_labels": str(task / "missing.nii.gz")})
    assert node_ids(world.scene) == before
