"""The Slicer Logic's run control headless: Slicer's real MRML (slicer-core), a real worker process,
the real sam2.1 tiny architecture with random weights at 256 px. What the panel's Apply, Cancel and
Refine do, minus the Qt timer (the tests call poll() as the timer would)."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from mrml_oracle import require_mrml
from phantoms import REPO, phantom
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap
from SAM2FewShotLib.slicer.panel import PanelChoices

slicer = require_mrml()

from SAM2FewShotLib.run.client import WorkerClient  # noqa: E402 - once slicer-core is known to be there
from SAM2FewShotLib.run.reports import report_axis  # noqa: E402
from SAM2FewShotLib.slicer import panel, result_segments, scene_io  # noqa: E402 - once slicer-core is known to be there
from SAM2FewShotLib.slicer.mrml_segments import (  # noqa: E402 - once slicer-core is known to be there
    add_labels_to_segmentation,
    labels_from_segmentation,
    register_segmentation_converters,
    segment_masks,
    write_segments,
)
from SAM2FewShotLib.slicer.mrml_volume import volume_to_node  # noqa: E402 - once slicer-core is known to be there
from SAM2FewShotLib.slicer.runs import RunController  # noqa: E402 - once slicer-core is known to be there

SHAPE = (8, 32, 32)  # 8 slices along k, the thick-slice (auto) axis
PROMPTED = 4
CHOICES = PanelChoices(method="propagate", device="cpu", random_weights=True, image_size=256)
ENGINE_PARENT = REPO / "SAM2FewShot"


def job_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("sam2fewshot-job-*")}


class Recorder:
    """The callbacks the panel gives the controller, recorded."""

    def __init__(self):
        self.progress, self.logs, self.finished, self.before_insert = [], [], [], []


def make_controller(scene, recorder, **env):
    def client():  # as the Logic does with PythonSlicer; one torch thread on this shared 2-core machine
        return WorkerClient(python=sys.executable, pythonpath=[ENGINE_PARENT],
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})

    return RunController(scene, client, lambda *a: recorder.progress.append(a), recorder.logs.append,
                         lambda ok, message: recorder.finished.append((ok, message)), recorder.before_insert.append)


def sent(controller, timeout: float = 60.0) -> None:
    """Poll until the run's files are written and its job is on the worker (a thread writes them)."""
    deadline = time.monotonic() + timeout
    while controller._preparing is not None:
        assert controller.poll() and time.monotonic() < deadline, "the job was not sent"
        time.sleep(0.01)


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
    ids = add_labels_to_segmentation(prompts_node, LabelMap(truth.volume.with_array(prompt), truth.segments),
                                     query_node)
    recorder = Recorder()
    controller = make_controller(scene, recorder)
    yield dict(scene=scene, image=image, truth=truth, prompt=prompt, query=query_node, prompts=prompts_node, ids=ids,
               recorder=recorder, controller=controller)
    controller.shutdown()


@pytest.fixture
def applied(world):
    """The world after an Apply into the query's own output (as the first test leaves it), made by each test
    that needs it: tests pass alone and in any order."""
    controller, recorder = world["controller"], world["recorder"]
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    wait(controller)
    assert recorder.finished[-1][0], recorder.finished[-1]
    return world


@pytest.fixture
def private_temp(tmp_path, monkeypatch):
    """The job folders go into this test's own temp folder: counting them is not disturbed by other
    processes of this machine (another test run, a Slicer) making and removing theirs."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture
def first_run(world, private_temp):
    """A query of its own and a fresh controller (its worker not started yet): a first Apply, whatever the
    other tests of this module did before."""
    recorder = Recorder()
    controller = make_controller(world["scene"], recorder)
    query = volume_to_node(world["image"], world["scene"], "first query")
    yield {**world, "query": query, "controller": controller, "recorder": recorder}
    controller.shutdown()


def test_apply_leaves_the_scene_alone_until_the_result_arrives_then_adds_it(first_run):
    world = first_run
    scene, controller, recorder = world["scene"], world["controller"], world["recorder"]
    nodes, folders = scene.GetNumberOfNodes(), job_folders()
    job_id = controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    assert controller.is_running and job_id.startswith("job-")
    folder = controller.run.folder.path
    controller._preparing.join()  # the files are written on a thread; the job is sent by the next poll
    assert sorted(p.name for p in folder.iterdir()) == ["owner.json", "prompts-labels.json", "prompts-labels.nrrd"]
    assert [p.suffix for p in controller.volumes.folder.iterdir()] in ([".nrrd", ".json"], [".json", ".nrrd"])
    polls = 0
    while controller.poll():
        polls += 1
        assert scene.GetNumberOfNodes() == nodes, "the scene changed while the job ran"
        time.sleep(0.02)
    assert polls > 0 and recorder.finished[-1][0], recorder.finished
    assert not folder.exists() and job_folders() == folders
    assert scene.GetNumberOfNodes() > nodes
    output = controller.output_node()
    assert output.GetName() == "first query SAM2FewShot"
    segments = [output.GetSegmentation().GetSegment(i) for i in controller.last.segment_ids]
    assert [s.GetName() for s in segments] == [s.name for s in world["truth"].segments]
    assert np.allclose(segments[0].GetColor(), world["truth"].segments[0].color)
    result = labels_from_segmentation(output, world["image"], controller.last.segment_ids).volume.array
    assert np.array_equal(result[PROMPTED], world["prompt"][PROMPTED])  # the mask-prompted slice, verbatim
    axis = report_axis(controller.last.report)
    for value, segment_id in enumerate(controller.last.segment_ids, start=1):  # kept as digests, not voxels
        assert controller.last.slice_digests[segment_id] == panel.slice_digests(result == value, axis)
    assert controller.last.query.array.strides == (0, 0, 0)  # the query's grid only: no copy of its voxels kept
    stages = {p[0] for p in recorder.progress}
    assert {"model", "propagate forward", "propagate backward"} <= stages
    flags = controller.low_confidence()
    assert all(f.slice != PROMPTED for f in flags)
    r, a, s = controller.slice_position(2)
    ijk = np.linalg.inv(world["image"].ijk_to_ras()) @ [r, a, s, 1.0]
    assert ijk[2] == pytest.approx(2.0)
    assert recorder.before_insert == [None]  # a new node: nothing for the Segment Editor to save
    assert "Background worker ready on CPU only (no CUDA GPU or MPS seen by PyTorch)" in recorder.logs


def edit(output, image, ids, change):
    """The user corrects the output with the Segment Editor: ``change(array)`` edits a label map of it, and each
    segment changes on the slices where its voxels did, and only there (segments may overlap after a Refine:
    the editor touches what is painted, not the voxels another segment covers elsewhere)."""
    edited = labels_from_segmentation(output, image, ids)
    before, array = edited.volume.array, edited.volume.array.copy()
    change(array)
    for value, (segment_id, own) in enumerate(segment_masks(output, image, ids), start=1):
        slices = [t for t in range(array.shape[0]) if not np.array_equal(array[t] == value, before[t] == value)]
        if slices:
            own[slices] = array[slices] == value
            segment = dataclasses.replace(edited.segments[value - 1], value=1)
            write_segments(output, LabelMap(edited.volume.with_array(own.astype(np.uint8)), (segment,)),
                           {1: segment_id})
    return array


def test_refine_keeps_the_prompts_and_every_correction_and_leaves_untouched_segments(applied):
    world = applied
    scene, controller, recorder = world["scene"], world["controller"], world["recorder"]
    assert controller.can_refine()
    output, ids = controller.output_node(), list(controller.last.segment_ids)
    before = labels_from_segmentation(output, world["image"], ids).volume.array

    def redraw_slice_6(array):
        array[6][array[6] == 1] = 0
        square = array[6, 10:16, 10:16]
        square[square == 0] = 1  # structure_1 redrawn; structure_2 not touched

    array = edit(output, world["image"], ids, redraw_slice_6)
    nodes = scene.GetNumberOfNodes()
    controller.start_refine(CHOICES)
    assert any("Refining structure_1 from corrected slices 6" in line for line in recorder.logs), recorder.logs[-3:]
    wait(controller)
    assert recorder.finished[-1][0], recorder.finished
    assert recorder.finished[-1][1].endswith("In 'query SAM2FewShot': replaced structure_1.")
    assert scene.GetNumberOfNodes() == nodes  # replaced in place: no new node, no new segment
    assert list(controller.last.segment_ids) == ids and output.GetSegmentation().GetNumberOfSegments() == len(ids)
    result = labels_from_segmentation(output, world["image"], ids).volume.array
    assert np.array_equal(result[6] == 1, array[6] == 1)  # the correction is a prompt, kept verbatim
    assert np.array_equal(result[PROMPTED] == 1, world["prompt"][PROMPTED] == 1)  # so is the original prompt
    assert np.array_equal(result == 2, before == 2)  # nobody touched structure_2: it is as it was
    report = controller.last.report
    assert report["method"] == "propagate" and report["worker"]["session_reused"]  # features stayed warm
    assert report["timing"]["frames_encoded"] == 0
    assert recorder.before_insert[-1] is output
    assert "warm worker" in recorder.finished[-1][1]
    first = recorder.finished[-1][1]

    def erase_slice_1(array):
        array[1][array[1] == 1] = 0  # a leak removed: structure_1 is absent on slice 1

    edit(output, world["image"], ids, erase_slice_1)
    controller.start_refine(CHOICES)
    assert any("from corrected slices 1" in line for line in recorder.logs), [x for x in recorder.logs if "Refin" in x]
    wait(controller)
    again = labels_from_segmentation(output, world["image"], ids).volume.array
    assert not (again[1] == 1).any()  # the erased slice stays empty
    assert np.array_equal(again[6] == 1, array[6] == 1)  # the earlier correction is still a prompt
    assert np.array_equal(again[PROMPTED] == 1, world["prompt"][PROMPTED] == 1)
    assert controller.last.prompt_slices[ids[0]] == {1, PROMPTED, 6}
    with pytest.raises(InputError, match="no slice differs"):
        controller.start_refine(CHOICES)
    print(f"\nthrough the Logic's run control: refine: {first}")


def test_a_rerun_replaces_only_what_runs_wrote_and_undo_takes_it_back(applied):
    world = applied
    scene, controller, recorder = world["scene"], world["controller"], world["recorder"]
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    mine = add_labels_to_segmentation(target, LabelMap(world["truth"].volume.with_array(world["prompt"]),
                                                       world["truth"].segments[:1]), world["query"])
    user_segment = labels_from_segmentation(target, world["image"], mine).volume.array
    segmentation = target.GetSegmentation()

    def names():
        return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]

    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"], output_node=target)
    wait(controller)
    assert names() == ["structure_1", "structure_1 (2)", "structure_2"]  # the user's own segment is not replaced
    assert recorder.finished[-1][1].endswith(
        "In 'mine': added structure_1 (2), structure_2; your 1 other segment unchanged.")
    written = list(controller.last.change.written)
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"], output_node=target)
    wait(controller)
    assert names() == ["structure_1", "structure_1 (2)", "structure_2"]  # Apply again: replaced, nothing added
    assert controller.last.change.written == written
    assert recorder.finished[-1][1].endswith(
        "In 'mine': replaced structure_1 (2), structure_2; your 1 other segment unchanged.")
    assert np.array_equal(labels_from_segmentation(target, world["image"], mine).volume.array, user_segment)

    assert controller.undo() == "Undone: 'mine' is as it was before the run."  # without the Segment Editor
    assert names() == ["structure_1", "structure_1 (2)", "structure_2"] and controller.last is None
    controller.undo()
    assert names() == ["structure_1"]
    assert np.array_equal(labels_from_segmentation(target, world["image"], mine).volume.array, user_segment)

    nodes = scene.GetNumberOfNodes()  # the query's own output: made on the first run, reused after
    own = result_segments.find_output(world["query"])
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    wait(controller)
    assert controller.output_node() is own and scene.GetNumberOfNodes() == nodes
    assert own.GetSegmentation().GetNumberOfSegments() == 2


def test_the_output_goes_beside_the_query_in_its_study_and_a_new_one_can_be_undone(world):
    scene = slicer.vtkMRMLScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    query = volume_to_node(world["image"], scene, "patient 2")
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 2"), "CT")
    hierarchy.CreateItem(study, query)  # as Slicer's DICOM import places a volume
    change = result_segments.insert(world["truth"], query, show_3d=True)
    node = change.node
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    assert node.GetNodeReference(result_segments.QUERY_ROLE) is query and result_segments.find_output(query) is node
    assert node.GetDisplayNode().GetVisibility2D() and node.GetDisplayNode().GetVisibility3D()
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")
    assert change.message() == "In 'patient 2 SAM2FewShot': added structure_1, structure_2."
    assert result_segments.undo(change) == "Undone: removed 'patient 2 SAM2FewShot', which the run had made."
    assert node.GetScene() is None and result_segments.find_output(query) is None


def test_closing_the_scene_cancels_the_run_and_a_newcomer_with_the_same_id_never_gets_a_result(world):
    scene = slicer.vtkMRMLScene()
    register_segmentation_converters()
    query = volume_to_node(world["image"], scene, "query")
    prompts = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prompts")
    ids = add_labels_to_segmentation(prompts, LabelMap(world["truth"].volume.with_array(world["prompt"]),
                                                       world["truth"].segments), query)
    recorder = Recorder()
    controller = make_controller(scene, recorder)
    try:
        controller.start_run(CHOICES, query, prompts, ids)
        run, old_id = controller.run, query.GetID()
        scene.Clear(0)  # File > Close scene while the run computes
        assert recorder.finished == [(False, "Cancelled: the scene was closed.")] and not controller.is_running
        assert controller.last is None and not controller.changes and not controller.can_refine()
        newcomer = volume_to_node(world["image"], scene, "another patient")
        assert newcomer.GetID() == old_id  # ids start again after a close
        labels = world["truth"]
        with pytest.raises(InputError, match="no longer in the scene"):
            scene_io.finish_run(run, labels, {}, None)  # were its result to arrive, it is refused
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
        assert not controller.poll()
    finally:
        controller.shutdown()


def test_propagate_slices_across_the_plane_the_prompts_were_drawn_in(world):
    scene, controller = world["scene"], world["controller"]
    image, truth = phantom((16, 16, 16), spacing=(1.0, 1.0, 1.0))  # isotropic: spacing says nothing
    query = volume_to_node(image, scene, "isotropic")
    sagittal = np.zeros_like(truth.volume.array)
    sagittal[:, :, [6, 10]] = truth.volume.array[:, :, [6, 10]]  # one slice through each structure
    prompts = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn sagittally")
    ids = add_labels_to_segmentation(prompts, LabelMap(image.with_array(sagittal), truth.segments), query)
    controller.start_run(CHOICES, query, prompts, ids)
    wait(controller)
    assert controller.last.report["session"]["axis"] == "i"  # across sagittal slices, as drawn
    both = sagittal.copy()
    both[8] = truth.volume.array[8]
    mixed = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn in two planes")
    mixed_ids = add_labels_to_segmentation(mixed, LabelMap(image.with_array(both), truth.segments), query)
    with pytest.raises(InputError, match=r"more than one plane \(axial and sagittal\).*under Advanced"):
        controller.start_run(CHOICES, query, mixed, mixed_ids)
    assert not controller.is_running


def test_bad_input_is_one_error_before_anything_starts(world, private_temp):
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
    reversed_range = PanelChoices(method="propagate", slice_range=(6, 2))  # the spin boxes keep what was typed
    with pytest.raises(InputError, match=r"starts after it ends \(6 > 2\): correct it under Advanced"):
        controller.start_run(reversed_range, world["query"], world["prompts"], world["ids"])
    assert not controller.is_running and scene.GetNumberOfNodes() == nodes and job_folders() == folders


def test_a_worker_that_dies_is_one_clear_message_and_the_scene_stays(world):
    scene, controller, recorder = world["scene"], world["controller"], world["recorder"]
    nodes = scene.GetNumberOfNodes()
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    folder = controller.run.folder.path
    sent(controller)
    psutil.Process(controller.client.pid).kill()
    wait(controller, timeout=30)
    ok, message = recorder.finished[-1]
    assert not ok and message.startswith("Segmentation failed: the computation ran out of memory")  # a SIGKILL
    assert scene.GetNumberOfNodes() == nodes and not folder.exists()


def test_cancel_kills_the_worker_at_once_and_the_next_run_starts_a_fresh_one(world):
    scene, controller, recorder = world["scene"], world["controller"], world["recorder"]
    nodes = scene.GetNumberOfNodes()
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    sent(controller)
    pid, folder = controller.client.pid, controller.run.folder.path
    controller.cancel()  # the panel gets control back at once; the worker dies on another thread
    controller.client.join_reapers(timeout=10)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert recorder.finished[-1] == (False, "Cancelled.") and controller.cancelled and not controller.is_running
    assert not folder.exists() and scene.GetNumberOfNodes() == nodes
    assert not controller.poll()
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    wait(controller)
    assert recorder.finished[-1][0] and controller.client.pid != pid


def test_the_expected_time_the_engine_gives_shows_beside_the_progress(world):
    """A run announces its expected time once it has timed its first slices (this one, though short,
    because the worker is told to announce any run); the panel keeps the line for its progress text."""
    recorder = Recorder()
    controller = make_controller(world["scene"], recorder, SAM2FEWSHOT_ANNOUNCE_AFTER_S="0")
    try:
        controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
        assert controller.estimate == ""  # nothing timed yet
        wait(controller)
        assert recorder.finished[-1][0], recorder.finished
        said = [line for line in recorder.logs if line.startswith("[warning] expected time: ")]
        assert len(said) == 1 and "more on this CPU at 256 px" in said[0]
        assert controller.estimate.startswith("Expected time: about ") and controller.estimate.endswith(" px.")
        assert panel.progress_text("propagate backward", 2, 8, controller.estimate).endswith(controller.estimate)
        controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
        assert controller.estimate == ""  # a new run: the last one's estimate is gone
        wait(controller)
    finally:
        controller.shutdown()


def test_cancel_while_the_files_are_written_sends_nothing_and_keeps_the_warm_worker(world):
    controller, recorder = world["controller"], world["recorder"]
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    wait(controller)  # a warm worker
    pid = controller.client.pid
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    preparing, folder = controller._preparing, controller.run.folder.path
    controller.cancel()  # before the job was sent: nothing to kill
    preparing.join(30)
    assert recorder.finished[-1] == (False, "Cancelled.") and not controller.is_running and not controller.poll()
    assert controller.client.pid == pid and controller.client.is_alive and controller.client.pending == []
    assert not folder.exists()
