"""Runs on a 4D sequence's proxy volume: the result goes only to the time point the run was made on.

Slicer's real MRML (slicer-core) with its real Sequences classes: a vtkMRMLSequenceNode of three
items of a small volume, browsed by a vtkMRMLSequenceBrowserNode whose proxy volume is updated by
the real vtkSlicerSequencesLogic, as in Slicer. The run control gets a stand-in worker that answers
each job with a prepared result through the same files and events, so the test can browse to
another time point between Apply and the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from phantoms import phantom
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap
from SAM2FewShotLib.io.volume_io import read_volume
from SAM2FewShotLib.slicer.panel import PanelChoices

slicer = pytest.importorskip("slicer", reason="Slicer's MRML is not importable (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLSequenceBrowserNode") or not hasattr(slicer, "vtkSlicerSequencesLogic"):
    pytest.skip("this slicer-core has no Sequences module classes (vtkMRMLSequenceBrowserNode)",
                allow_module_level=True)

import test_slicer_user_edits as user_edits_tests  # noqa: E402 - its stand-in worker; once slicer-core is there

from SAM2FewShotLib.slicer import result_segments, sequences  # noqa: E402
from SAM2FewShotLib.slicer.mrml_segments import (  # noqa: E402
    add_labels_to_segmentation,
    geometry_image,
    labels_from_segmentation,
    register_segmentation_converters,
)
from SAM2FewShotLib.slicer.mrml_volume import fill_image, volume_from_node, volume_to_node  # noqa: E402
from SAM2FewShotLib.slicer.runs import RunController  # noqa: E402

CHOICES = PanelChoices(method="propagate", device="cpu", random_weights=True, image_size=256)
TIMES = ("0", "0.5", "1")  # the items' index values (seconds)


class StandInWorker(user_edits_tests.StandInWorker):
    """The user-edits tests' stand-in worker, whose reports name the slicing axis (Refine needs it)."""

    def submit(self, job) -> str:
        job_id = super().submit(job)
        report = {"method": "propagate", "session": {"axis": "k"}}
        Path(self.events[-1]["report"]).write_text(json.dumps(report), encoding="utf-8")
        return job_id


def sequence_of(scene, nodes, name: str):
    """A sequence holding ``nodes`` at TIMES (the items are copies in the sequence's own scene)."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    for node, value in zip(nodes, TIMES, strict=True):
        sequence.SetDataNodeAtValue(node, value)
        scene.RemoveNode(node)
    return sequence


@pytest.fixture
def world(tmp_path):
    """A 4D sequence of three frames (each brighter than the last) browsed at its first item, prompts
    on the proxy, and a run control on a stand-in worker."""
    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSequencesLogic()  # registers the Sequences nodes, updates proxies when browsed
    logic.SetMRMLScene(scene)
    image, truth = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0))
    frames = [volume_to_node(image.with_array(image.array + 100 * n), scene, f"frame{n}") for n in range(3)]
    sequence = sequence_of(scene, frames, "CT sequence")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "CT browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    logic.UpdateProxyNodesFromSequences(browser)
    browser.SetSelectedItemNumber(0)
    proxy = browser.GetProxyNode(sequence)
    prompt = np.zeros_like(truth.volume.array)
    prompt[4] = truth.volume.array[4]
    prompts = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prompts")
    ids = add_labels_to_segmentation(prompts, LabelMap(truth.volume.with_array(prompt), truth.segments), proxy)
    worker, finished = StandInWorker(tmp_path), []
    controller = RunController(scene, lambda: worker, on_finished=lambda ok, message: finished.append((ok, message)))
    yield dict(scene=scene, logic=logic, image=image, truth=truth, sequence=sequence, browser=browser, proxy=proxy,
               prompts=prompts, ids=ids, worker=worker, controller=controller, finished=finished)
    controller.shutdown()


def start(world, query=None, output=None, result: LabelMap | None = None) -> None:
    """Apply on ``query`` (the proxy by default); its result is waiting for the next poll."""
    world["worker"].results.append(result or world["truth"])
    world["controller"].start_run(CHOICES, query or world["proxy"], world["prompts"], world["ids"], output_node=output)


def finish(world) -> tuple[bool, str]:
    while world["controller"].poll():
        pass
    return world["finished"][-1]


def segmentations(scene) -> list[str]:
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    return [nodes.GetItemAsObject(n).GetName() for n in range(nodes.GetNumberOfItems())]


def test_the_proxy_shows_the_browsed_item_and_a_run_records_it(world):
    """The premise, on the real classes: one proxy node, whose voxels change when the browser moves."""
    proxy, browser = world["proxy"], world["browser"]
    first = volume_from_node(proxy).array.copy()
    browser.SetSelectedItemNumber(2)
    assert np.array_equal(volume_from_node(proxy).array, first + 200)
    browser.SetSelectedItemNumber(1)
    start(world)
    frame = world["controller"].run.frame
    assert (frame.browser, frame.sequence, frame.item, frame.index_value) == (browser, world["sequence"], 1, "0.5")
    job, problem = world["controller"]._preparing.outcome()  # the job's files, written on a thread
    assert problem is None and np.array_equal(read_volume(job.query).array, first + 100)  # the recorded item
    assert frame.label() == "time point 2 (time = 0.5 s)"
    assert finish(world)[0]
    assert world["controller"].last.frame == frame


def test_browsing_to_another_item_before_the_result_refuses_it_in_one_sentence(world):
    scene, browser = world["scene"], world["browser"]
    before = segmentations(scene)
    start(world)
    browser.SetSelectedItemNumber(1)  # the user browses on while the segmentation is computed
    ok, message = finish(world)
    assert not ok
    assert message == ("The result was not added: the sequence was moved to another time point while the "
                       "segmentation was computed; go back to time point 1 (time = 0 s) and run again")
    assert segmentations(scene) == before  # nothing written, to item 2 or anywhere
    assert result_segments.find_output(world["proxy"]) is None
    assert world["controller"].last is None and not world["controller"].is_running


def test_browsing_away_and_back_before_the_result_accepts_it(world):
    start(world)
    world["browser"].SetSelectedItemNumber(2)
    world["browser"].SetSelectedItemNumber(0)
    ok, message = finish(world)
    assert ok, message
    assert result_segments.find_output(world["proxy"], "0") is not None


def test_each_time_point_gets_an_output_of_its_own_and_apply_again_finds_it(world):
    scene, browser, controller = world["scene"], world["browser"], world["controller"]
    start(world)
    assert finish(world)[0]
    first = controller.output_node()
    browser.SetSelectedItemNumber(2)
    start(world)
    assert finish(world)[0]
    third = controller.output_node()
    assert third is not first  # the result of time point 3 did not replace time point 1's
    assert [first.GetName(), third.GetName()] == ["CT sequence SAM2FewShot time point 1 (time = 0 s)",
                                                  "CT sequence SAM2FewShot time point 3 (time = 1 s)"]
    assert first.GetSegmentation().GetNumberOfSegments() == 2 == third.GetSegmentation().GetNumberOfSegments()
    browser.SetSelectedItemNumber(0)
    nodes = scene.GetNumberOfNodes()
    start(world)  # Apply again on time point 1: its own output, replaced in place
    ok, message = finish(world)
    assert ok and "replaced" in message and controller.output_node() is first and scene.GetNumberOfNodes() == nodes
    assert result_segments.find_output(world["proxy"]) is None  # no output of the proxy outside any time point


def test_an_item_inserted_before_the_recorded_one_counts_as_moved(world):
    """The item number alone could match another time point: its index value is compared too."""
    start(world)
    extra = volume_to_node(world["image"], world["scene"], "extra")
    world["sequence"].SetDataNodeAtValue(extra, "-0.5")  # now item 0 is t = -0.5 s, shown by the same number
    world["scene"].RemoveNode(extra)
    ok, message = finish(world)
    assert not ok and "go back to time point 1 (time = 0 s)" in message


def test_a_segmentation_of_the_same_browser_gets_nothing_when_moved_and_its_item_when_not(world):
    """An output segmentation that is itself a proxy (a segmentation sequence in the same browser): the
    result is written into the proxy only while it shows the recorded item."""
    scene, browser = world["scene"], world["browser"]
    empty = [scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"seg{n}") for n in range(3)]
    segmentation_sequence = sequence_of(scene, empty, "Seg sequence")
    browser.AddSynchronizedSequenceNodeID(segmentation_sequence.GetID())
    world["logic"].UpdateProxyNodesFromSequences(browser)
    output = browser.GetProxyNode(segmentation_sequence)

    def segments_per_item() -> list[int]:
        return [segmentation_sequence.GetNthDataNode(n).GetSegmentation().GetNumberOfSegments() for n in range(3)]

    start(world, output=output)
    browser.SetSelectedItemNumber(1)
    ok, message = finish(world)
    assert not ok and "go back to time point 1" in message
    assert segments_per_item() == [0, 0, 0] and output.GetSegmentation().GetNumberOfSegments() == 0

    start(world, output=output)
    browser.SetSelectedItemNumber(1)  # a run started on item 2 and still shown
    ok, message = finish(world)
    assert ok, message
    assert output.GetSegmentation().GetNumberOfSegments() == len(world["truth"].segments)


def test_refine_uses_the_frame_it_was_made_on_and_refuses_on_another(world):
    browser, controller = world["browser"], world["controller"]
    browser.SetSelectedItemNumber(2)
    start(world)
    assert finish(world)[0]
    last = controller.last
    assert last.frame.item == 2
    browser.SetSelectedItemNumber(0)
    with pytest.raises(InputError, match=r"^the sequence shows another time point than the last result; "
                                         r"go back to time point 3 \(time = 1 s\), where it was made"):
        controller.start_refine(CHOICES)
    browser.SetSelectedItemNumber(2)
    user_paints_a_square(last.output_node, last.query, last.segment_ids[0])
    world["worker"].results.append(world["truth"])
    controller.start_refine(CHOICES)
    assert controller.run.frame == last.frame and controller.run.query.same_grid(last.query)  # made on that frame
    job, problem = controller._preparing.outcome()
    assert problem is None and np.array_equal(read_volume(job.query).array, volume_from_node(world["proxy"]).array)
    browser.SetSelectedItemNumber(1)
    ok, message = finish(world)
    assert not ok and message.endswith("go back to time point 3 (time = 1 s) and run again")


def user_paints_a_square(node, image, segment_id: str) -> None:
    """As a Segment Editor effect writes it (vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment)."""
    new = (labels_from_segmentation(node, image, [segment_id]).volume.array == 1).astype(np.uint8)
    new[3, 2:6, 2:6] = 1
    modifier = geometry_image(image.ijk_to_ras(), new.shape)
    fill_image(modifier, new)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(modifier, node, segment_id, logic.MODE_REPLACE)


def test_a_run_on_a_plain_volume_records_no_frame_and_is_unchanged(world):
    plain = volume_to_node(world["image"], world["scene"], "plain CT")
    assert sequences.frame_of(plain) is None
    start(world, query=plain)
    assert world["controller"].run.frame is None
    world["browser"].SetSelectedItemNumber(2)  # another volume's browser moving changes nothing
    ok, message = finish(world)
    assert ok, message
    assert world["controller"].last.frame is None and result_segments.find_output(plain) is not None


def test_apply_on_a_playing_sequence_is_refused_before_anything_starts(world):
    world["browser"].SetPlaybackActive(True)
    with pytest.raises(InputError, match="the sequence is playing: stop it at the time point to segment"):
        start(world)
    assert not world["controller"].is_running
