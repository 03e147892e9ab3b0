"""The Slicer Logic's run control headless: Slicer's real MRML (slicer-core), a real worker process,
the real sam2.1 tiny architecture with random weights at 256 px. What the panel's Apply, Cancel and
Refine do, minus the Qt timer (the tests call poll() as the timer would)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from phantoms import phantom
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap
from SAM2FewShotLib.slicer.panel import PanelChoices

slicer = pytest.importorskip("slicer", reason="Slicer's MRML is not importable (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module found has no MRML classes (pip install slicer-core)", allow_module_level=True)

from SAM2FewShotLib.run.client import WorkerClient
from SAM2FewShotLib.slicer.mrml_segments import (
    add_labels_to_segmentation,
    labels_from_segmentation,
    register_segmentation_converters,
)
from SAM2FewShotLib.slicer.mrml_volume import volume_to_node
from SAM2FewShotLib.slicer.runs import RunController

SHAPE = (8, 32, 32)  # 8 slices along k, the thick-slice (auto) axis
PROMPTED = 4
CHOICES = PanelChoices(method="propagate", device="cpu", random_weights=True, image_size=256)
ENGINE_PARENT = Path(__file__).resolve().parents[1] / "SAM2FewShot"


def job_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("sam2fewshot-job-*")}


class Recorder:
    """The callbacks the panel gives the controller, recorded."""

    def __init__(self):
        self.progress, self.logs, self.finished, self.before_insert = [], [], [], []


def make_controller(scene, recorder):
    def client():  # as the Logic does with PythonSlicer; one torch thread on this shared 2-core machine
        return WorkerClient(python=sys.executable, pythonpath=[ENGINE_PARENT], env={**os.environ, "OMP_NUM_THREADS": "1"})

    return RunController(scene, client, lambda *a: recorder.progress.append(a), recorder.logs.append,
                         lambda ok, message: recorder.finished.append((ok, message)), recorder.before_insert.append)


def wait(controller, timeout: float = 300.0) -> int:
    """Poll like the panel's timer until the run ends; the number of polls that saw it running."""
    polls, deadline = 0, time.monotonic() + timeout
    while controller.poll():
        polls += 1
        assert time.monotonic() < deadline, "the run did not end in time"
        time.sleep(0.02)
    return polls


@pytest.fixture(scope="module")
def world():
    """A scene with a query volume and a segmentation holding masks on one slice, and one controller
    whose worker stays warm across the tests that do not kill it."""
    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    image, truth = phantom(SHAPE, spacing=(1.0, 1.0, 3.0))
    query_node = volume_to_node(image, scene, "query")
    prompt = np.zeros_like(truth.volume.array)
    prompt[PROMPTED] = truth.volume.array[PROMPTED]
    prompts_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prompts")
    ids = add_labels_to_segmentation(prompts_node, LabelMap(truth.volume.with_array(prompt), truth.segments), query_node)
    recorder = Recorder()
    controller = make_controller(scene, recorder)
    yield dict(scene=scene, image=image, truth=truth, prompt=prompt, query=query_node, prompts=prompts_node, ids=ids,
               recorder=recorder, controller=controller)
    controller.shutdown()


def test_apply_leaves_the_scene_alone_until_the_result_arrives_then_adds_it(world):
    scene, controller, recorder = world["scene"], world["controller"], world["recorder"]
    nodes, folders = scene.GetNumberOfNodes(), job_folders()
    job_id = controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    assert controller.is_running and job_id.startswith("job-")
    folder = controller.run.folder.path
    assert sorted(p.name for p in folder.iterdir()) == ["prompts.seg.nrrd", "query.nrrd"]
    polls = 0
    while controller.poll():
        polls += 1
        assert scene.GetNumberOfNodes() == nodes, "the scene changed while the job ran"
        time.sleep(0.02)
    assert polls > 0 and recorder.finished[-1][0], recorder.finished
    assert not folder.exists() and job_folders() == folders
    assert scene.GetNumberOfNodes() > nodes
    output = controller.output_node()
    assert output.GetName() == "query SAM2FewShot"
    segments = [output.GetSegmentation().GetSegment(i) for i in controller.last.segment_ids]
    assert [s.GetName() for s in segments] == [s.name for s in world["truth"].segments]
    assert np.allclose(segments[0].GetColor(), world["truth"].segments[0].color)
    result = labels_from_segmentation(output, world["image"], controller.last.segment_ids).volume.array
    assert np.array_equal(result[PROMPTED], world["prompt"][PROMPTED])  # the mask-prompted slice, verbatim
    assert np.array_equal(controller.last.labels, result)
    stages = {p[0] for p in recorder.progress}
    assert {"model", "propagate forward", "propagate backward"} <= stages
    flags = controller.low_confidence()
    assert all(f.slice != PROMPTED for f in flags)
    r, a, s = controller.slice_position(2)
    ijk = np.linalg.inv(world["image"].ijk_to_ras()) @ [r, a, s, 1.0]
    assert ijk[2] == pytest.approx(2.0)
    assert recorder.before_insert == [None]  # a new node: nothing for the Segment Editor to save


def test_refine_propagates_from_the_edited_slice_on_the_warm_worker(world):
    scene, controller, recorder = world["scene"], world["controller"], world["recorder"]
    assert controller.can_refine()
    output, ids = controller.output_node(), list(controller.last.segment_ids)
    edited = labels_from_segmentation(output, world["image"], ids)
    array = edited.volume.array.copy()
    array[6] = 0
    array[6, 10:16, 10:16] = 1  # the user redraws slice 6 with the Segment Editor
    add_labels_to_segmentation(output, LabelMap(edited.volume.with_array(array), edited.segments), existing="replace")
    nodes = scene.GetNumberOfNodes()
    controller.start_refine(CHOICES)
    assert any("edited slices 6" in line for line in recorder.logs)
    wait(controller)
    assert recorder.finished[-1][0], recorder.finished
    assert scene.GetNumberOfNodes() == nodes  # replaced in place: no new node, no new segment
    assert list(controller.last.segment_ids) == ids and output.GetSegmentation().GetNumberOfSegments() == len(ids)
    result = labels_from_segmentation(output, world["image"], ids).volume.array
    assert np.array_equal(result[6], array[6])  # the edit is the prompt, kept verbatim
    report = controller.last.report
    assert report["method"] == "propagate" and report["worker"]["session_reused"]  # features stayed warm
    assert report["timing"]["frames_encoded"] == 0
    assert recorder.before_insert[-1] is output
    assert "warm worker" in recorder.finished[-1][1]
    print(f"\nthrough the Logic's run control: first run: {recorder.finished[0][1]}\nrefine: {recorder.finished[-1][1]}")


def test_results_into_an_existing_segmentation_follow_the_policy(world):
    scene, controller = world["scene"], world["controller"]
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    mine = add_labels_to_segmentation(target, LabelMap(world["truth"].volume.with_array(world["prompt"]),
                                                       world["truth"].segments[:1]), world["query"])
    before = labels_from_segmentation(target, world["image"], mine).volume.array
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"], output_node=target, existing="keep")
    wait(controller)
    names = [target.GetSegmentation().GetNthSegment(n).GetName() for n in range(target.GetSegmentation().GetNumberOfSegments())]
    assert names == ["structure_1", "structure_2"]  # the same-named segment kept, the other added
    assert np.array_equal(labels_from_segmentation(target, world["image"], mine).volume.array, before)
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"], output_node=target, existing="add")
    wait(controller)
    assert target.GetSegmentation().GetNumberOfSegments() == 4


def test_bad_input_is_one_error_before_anything_starts(world):
    scene, controller = world["scene"], world["controller"]
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    empty.GetSegmentation().AddEmptySegment("nothing")
    nodes, folders = scene.GetNumberOfNodes(), job_folders()
    with pytest.raises(InputError, match="no voxel"):
        controller.start_run(CHOICES, world["query"], empty, None)
    with pytest.raises(InputError, match="select the query"):
        controller.start_run(CHOICES, None, world["prompts"], world["ids"])
    with pytest.raises(InputError, match="support volume"):
        controller.start_run(PanelChoices(method="matched-support"), world["query"], world["prompts"], world["ids"])
    with pytest.raises(InputError, match="support volume"):  # guided needs a labelled support too
        controller.start_run(PanelChoices(method="guided"), world["query"], world["prompts"], world["ids"])
    assert not controller.is_running and scene.GetNumberOfNodes() == nodes and job_folders() == folders


def test_a_worker_that_dies_is_one_clear_message_and_the_scene_stays(world):
    scene, controller, recorder = world["scene"], world["controller"], world["recorder"]
    nodes = scene.GetNumberOfNodes()
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    folder = controller.run.folder.path
    psutil.Process(controller.client.pid).kill()
    wait(controller, timeout=30)
    ok, message = recorder.finished[-1]
    assert not ok and message.startswith("Segmentation failed: the worker stopped unexpectedly")
    assert scene.GetNumberOfNodes() == nodes and not folder.exists()


def test_cancel_kills_the_worker_at_once_and_the_next_run_starts_a_fresh_one(world):
    scene, controller, recorder = world["scene"], world["controller"], world["recorder"]
    nodes = scene.GetNumberOfNodes()
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    pid, folder = controller.client.pid, controller.run.folder.path
    start = time.monotonic()
    controller.cancel()
    assert time.monotonic() - start < 1.0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert recorder.finished[-1] == (False, "Cancelled.") and controller.cancelled and not controller.is_running
    assert not folder.exists() and scene.GetNumberOfNodes() == nodes
    assert not controller.poll()
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    wait(controller)
    assert recorder.finished[-1][0] and controller.client.pid != pid
