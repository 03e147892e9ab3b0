"""Apply never deletes or overwrites what the user edited, and its undo lives on disk, bounded.

Slicer's real MRML (slicer-core). The issue's reproduction runs a real worker; the other tests give
the run control a stand-in worker that answers each job with a prepared result through the same
files and events, so only the result's voxels are chosen by the test. The user's edits are made
as the Segment Editor makes them (vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mrml_oracle import require_mrml
from phantoms import REPO, phantom
from SAM2FewShotLib.common.cache import cache_dir
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap, Segment
from SAM2FewShotLib.slicer.panel import PanelChoices

slicer = require_mrml()

from SAM2FewShotLib.io.volume_io import read_labels, write_labels  # noqa: E402 - once slicer-core is known to be there
from SAM2FewShotLib.slicer import result_segments, undo_store, user_edits  # noqa: E402
from SAM2FewShotLib.slicer.mrml_segments import (  # noqa: E402
    add_labels_to_segmentation,
    geometry_image,
    labels_from_segmentation,
    register_segmentation_converters,
    segment_tag,
)
from SAM2FewShotLib.slicer.mrml_volume import fill_image, volume_to_node  # noqa: E402
from SAM2FewShotLib.slicer.runs import RunController  # noqa: E402

CHOICES = PanelChoices(method="propagate", device="cpu", random_weights=True, image_size=256)
LIVER, SPLEEN = Segment(1, "Liver", (0.8, 0.3, 0.2)), Segment(2, "Spleen", (0.2, 0.5, 0.9))
K = undo_store.UNDO_DEPTH


class StandInWorker:
    """Answers each submitted job with the next prepared result, as the worker's files and events."""

    def __init__(self, folder: Path):
        self.folder, self.results, self.events, self.prompts = folder, [], [], []

    def submit(self, job) -> str:
        self.prompts.append(read_labels(job.prompt_labels) if job.prompt_labels else None)  # gone after the run
        labels_path = write_labels(self.results.pop(0), self.folder / f"{job.id}.seg.nrrd")
        report = self.folder / f"{job.id}.json"
        report.write_text(json.dumps({"method": "propagate", "session": {"axis": "k"}}), encoding="utf-8")
        self.events.append({"event": "result", "id": job.id, "labels": str(labels_path), "report": str(report),
                            "seconds": 0.1, "frames_encoded": 0})
        return job.id

    def poll(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    def cancel(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.fixture
def scene_world(tmp_path):
    """A scene with a query and prompts for Liver and Spleen, and a run control on a stand-in worker."""
    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    image, truth = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0))
    labels = LabelMap(truth.volume, (LIVER, SPLEEN))
    query = volume_to_node(image, scene, "CT")
    prompt = np.zeros_like(truth.volume.array)
    prompt[4] = truth.volume.array[4]
    prompts = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prompts")
    ids = add_labels_to_segmentation(prompts, LabelMap(truth.volume.with_array(prompt), labels.segments), query)
    worker = StandInWorker(tmp_path)
    finished = []
    controller = RunController(scene, lambda: worker, on_finished=lambda ok, message: finished.append((ok, message)))
    world = dict(scene=scene, image=image, labels=labels, query=query, prompts=prompts, ids=ids, worker=worker,
                 controller=controller, finished=finished)
    yield world
    world["controller"].shutdown()


def apply(world, result: LabelMap, controller=None) -> str:
    """One Apply whose result is ``result``; the panel's message."""
    controller = controller or world["controller"]
    world["worker"].results.append(result)
    controller.start_run(CHOICES, world["query"], world["prompts"], world["ids"])
    while controller.poll():
        pass
    ok, message = world["finished"][-1]
    assert ok, message
    return message


def only(labels: LabelMap, *names: str) -> LabelMap:
    """The result of a run where only these structures were selected."""
    keep = [s for s in labels.segments if s.name in names]
    array = np.where(np.isin(labels.volume.array, [s.value for s in keep]), labels.volume.array, 0)
    return LabelMap(labels.volume.with_array(array.astype(np.uint8)), tuple(keep))


def shifted(labels: LabelMap, by: int = 1) -> LabelMap:
    """Another run's result: the same structures, one voxel over."""
    return LabelMap(labels.volume.with_array(np.roll(labels.volume.array, by, axis=2)), labels.segments)


def segment_id(node, name: str) -> str:
    segmentation = node.GetSegmentation()
    return next(segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())
                if segmentation.GetNthSegment(n).GetName() == name)


def names(node) -> list[str]:
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]


def mask(node, image, name: str) -> np.ndarray:
    return labels_from_segmentation(node, image, [segment_id(node, name)]).volume.array == 1


def user_edit(node, image, name: str) -> np.ndarray:
    """The user paints a square into the segment, as a Segment Editor effect writes it; the new mask."""
    new = mask(node, image, name)
    new[3, 2:6, 2:6] = True
    paint(node, image, name, new)
    return new


def paint(node, image, name: str, new: np.ndarray) -> None:
    """The segment becomes ``new``, as a Segment Editor effect writes it (other segments untouched)."""
    modifier = geometry_image(image.ijk_to_ras(), new.shape)
    fill_image(modifier, new.astype(np.uint8))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(modifier, node, segment_id(node, name), logic.MODE_REPLACE)


def state(node, image) -> list[tuple]:
    """Everything undo must restore: order, ids, names, colours, tags, voxels, display."""
    segmentation, display = node.GetSegmentation(), node.GetDisplayNode()
    out = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id, segment = segmentation.GetNthSegmentID(n), segmentation.GetNthSegment(n)
        voxels = labels_from_segmentation(node, image, [segment_id]).volume.array
        tags = tuple(segment_tag(segment, t) for t in (user_edits.RUN_TAG, user_edits.STRUCTURE_TAG,
                                                      user_edits.DIGEST_TAG, segment.GetTerminologyEntryTagName()))
        out.append((segment_id, segment.GetName(), tuple(np.round(segment.GetColor(), 6)), tags, voxels.tobytes(),
                    display.GetSegmentVisibility(segment_id), display.GetSegmentOpacity2DFill(segment_id)))
    return out


def test_the_issues_reproduction_an_edited_segment_is_kept_when_the_next_run_lacks_it():
    """Run 1 writes Liver and Spleen; the user edits Spleen; run 2 with only Liver selected keeps it
    (a real worker: the stock sam2.1 tiny architecture, random weights, 256 px)."""
    from SAM2FewShotLib.run.client import WorkerClient

    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    image, truth = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0))
    query = volume_to_node(image, scene, "CT")
    prompt = np.zeros_like(truth.volume.array)
    prompt[4] = truth.volume.array[4]
    prompts = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prompts")
    ids = add_labels_to_segmentation(prompts, LabelMap(truth.volume.with_array(prompt), (LIVER, SPLEEN)), query)
    finished = []
    controller = RunController(
        scene, lambda: WorkerClient(python=sys.executable, pythonpath=[REPO / "SAM2FewShot"],
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}),
        on_finished=lambda ok, message: finished.append((ok, message)))
    try:
        for chosen in (ids, ids[:1]):
            controller.start_run(CHOICES, query, prompts, chosen)
            while controller.poll():
                pass
            assert finished[-1][0], finished[-1]
            if chosen == ids:
                output = controller.output_node()
                edited = user_edit(output, image, "Spleen")
    finally:
        controller.shutdown()
    message = finished[-1][1]
    assert "removed" not in message and message.endswith("In 'CT SAM2FewShot': replaced Liver; "
                                                          "kept Spleen as you edited it.")
    assert names(output) == ["Liver", "Spleen"] and np.array_equal(mask(output, image, "Spleen"), edited)


def test_a_new_result_goes_beside_an_edited_segment_as_name_new(scene_world):
    world, image, labels = scene_world, scene_world["image"], scene_world["labels"]
    apply(world, labels)
    output = world["controller"].output_node()
    edited = user_edit(output, image, "Spleen")
    message = apply(world, shifted(labels))
    assert message.endswith("In 'CT SAM2FewShot': replaced Liver; "
                            "kept Spleen as you edited it, the new result is beside it as Spleen (new).")
    assert names(output) == ["Liver", "Spleen", "Spleen (new)"]
    assert np.array_equal(mask(output, image, "Spleen"), edited)  # the user's, voxel for voxel
    assert np.array_equal(mask(output, image, "Spleen (new)"), shifted(labels).volume.array == 2)
    again = apply(world, labels)  # the new one is the run's while nobody edits it: replaced in place
    assert again.endswith("replaced Liver, Spleen (new); kept Spleen as you edited it.")
    assert names(output) == ["Liver", "Spleen", "Spleen (new)"]
    assert np.array_equal(mask(output, image, "Spleen"), edited)


def test_unchanged_run_written_segments_are_replaced_and_removed_as_before(scene_world):
    world, image, labels = scene_world, scene_world["image"], scene_world["labels"]
    assert apply(world, labels).endswith("In 'CT SAM2FewShot': added Liver, Spleen.")
    output = world["controller"].output_node()
    user_edit(output, image, "Liver")  # Spleen shares Liver's layer: it must not look edited
    assert apply(world, shifted(labels)).endswith("replaced Spleen; kept Liver as you edited it, "
                                                  "the new result is beside it as Liver (new).")
    assert apply(world, only(labels, "Liver")).endswith(
        "replaced Liver (new); removed Spleen (left by an earlier run); kept Liver as you edited it.")
    assert names(output) == ["Liver", "Liver (new)"]


def test_refine_replaces_the_segments_the_user_chose_to_correct_edited_or_not(scene_world):
    world, image, labels = scene_world, scene_world["image"], scene_world["labels"]
    change = result_segments.insert(labels, world["query"])
    output = change.node
    user_edit(output, image, "Spleen")
    spleen = segment_id(output, "Spleen")
    refined = result_segments.insert(only(shifted(labels), "Spleen"), world["query"], targets={2: spleen})
    assert refined.message() == "In 'CT SAM2FewShot': replaced Spleen."  # Liver: a run's, untouched, not "other"
    assert names(output) == ["Liver", "Spleen"] and refined.written == [spleen]
    assert np.array_equal(mask(output, image, "Spleen"), shifted(labels).volume.array == 2)
    assert not user_edits.is_edited(output.GetSegmentation().GetSegment(spleen))  # the run's again


def test_the_digest_survives_saving_and_reloading_the_segmentation(scene_world, tmp_path):
    world, labels = scene_world, scene_world["labels"]
    output = result_segments.insert(labels, world["query"]).node
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp_path / "saved.seg.nrrd"))
    assert storage.WriteData(output)
    reloaded = world["scene"].AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    assert storage.ReadData(reloaded)
    assert [edited for _, _, edited in user_edits.run_written(reloaded)] == [False, False]


def test_undo_after_a_module_reload_restores_exactly(scene_world):
    world, image, labels = scene_world, scene_world["image"], scene_world["labels"]
    apply(world, labels)
    output = world["controller"].output_node()
    display = output.GetDisplayNode()
    display.SetSegmentOpacity2DFill(segment_id(output, "Spleen"), 0.25)
    display.SetSegmentVisibility(segment_id(output, "Liver"), False)
    before = state(output, image)
    apply(world, only(shifted(labels), "Liver"))  # Liver replaced, Spleen removed
    assert names(output) == ["Liver"]
    world["controller"].shutdown()  # the module's cleanup on reload; the modules imported again
    reloaded_store = importlib.reload(undo_store)
    reloaded_runs = importlib.reload(sys.modules["SAM2FewShotLib.slicer.runs"])
    controller = reloaded_runs.RunController(world["scene"], lambda: world["worker"])
    world["controller"] = controller
    assert isinstance(controller.undo_store, reloaded_store.UndoStore) and controller.can_undo()
    assert controller.undo() == "Undone: 'CT SAM2FewShot' is as it was before the run."
    assert state(output, image) == before
    assert controller.undo() == "Undone: removed 'CT SAM2FewShot', which the run had made."
    assert output.GetScene() is None and not controller.can_undo()
    with pytest.raises(InputError, match="nothing to undo"):
        controller.undo()


def test_undo_history_is_bounded_and_pruned_on_disk(scene_world):
    world, labels = scene_world, scene_world["labels"]
    controller = world["controller"]
    for n in range(K + 2):
        apply(world, shifted(labels, n))
    entries = controller.changes
    assert len(entries) == K and [int(p.name) for p in entries] == list(range(3, K + 3))
    folder = controller.undo_store.folder
    assert folder.parent == cache_dir() / "undo" and sorted(folder.iterdir()) == entries  # the rest deleted
    for _ in range(K):
        assert controller.undo().startswith("Undone:")
    assert not controller.can_undo() and controller.changes == []


def test_undo_data_is_on_disk_not_in_memory(scene_world):
    world, labels = scene_world, scene_world["labels"]
    controller = world["controller"]
    apply(world, labels)
    apply(world, shifted(labels))
    assert controller.last.change.saved == []  # the snapshots went to disk
    assert vars(controller.undo_store) == {"scene": world["scene"]}  # no history in memory: read from disk
    entries = controller.changes
    assert all(isinstance(p, Path) for p in entries)
    files = sorted(p.name for p in entries[-1].iterdir())
    assert files == ["entry.json", "segments.seg.nrrd"] and (entries[-1] / "segments.seg.nrrd").stat().st_size < 20_000
    assert sorted(p.name for p in entries[0].iterdir()) == ["entry.json"]  # the first run replaced nothing


def test_closing_the_scene_deletes_its_history_and_stale_sessions_are_pruned(scene_world):
    world, labels = scene_world, scene_world["labels"]
    gone = cache_dir() / "undo" / "4242-deadbeef-0x1"  # a crashed Slicer's, last touched 8 days ago
    (gone / "000001").mkdir(parents=True)
    recent = cache_dir() / "undo" / "4243-cafef00d-0x1"  # another Slicer's, running
    recent.mkdir()
    mine = cache_dir() / "undo" / f"{undo_store.session_token()}-0x2"  # another scene of this process
    mine.mkdir()
    week_ago = time.time() - undo_store.STALE_AFTER_S - 24 * 3600
    for folder in (gone, mine):
        os.utime(folder, (week_ago, week_ago))
    apply(world, labels)  # a new history: the stale ones go
    assert not gone.exists() and recent.is_dir() and mine.is_dir()
    folder = world["controller"].undo_store.folder
    assert folder.is_dir()
    world["scene"].Clear(0)
    assert not folder.exists() and not world["controller"].can_undo()


def test_refine_sends_a_corrected_slice_whole_where_another_segment_overlaps_it(scene_world):
    """Segments may overlap in Slicer: Liver drawn over Spleen on one slice is sent whole as Liver's prompt
    (a label map of the segmentation would give those voxels to one of them only)."""
    world, image, labels = scene_world, scene_world["image"], scene_world["labels"]
    apply(world, labels)
    output = world["controller"].output_node()
    spleen = mask(output, image, "Spleen")
    t = int(np.argmax(spleen.sum(axis=(1, 2))))
    liver = mask(output, image, "Liver")
    liver[t] |= spleen[t]  # drawn over the spleen, which keeps its voxels
    paint(output, image, "Liver", liver)
    assert np.array_equal(mask(output, image, "Spleen"), spleen) and np.array_equal(mask(output, image, "Liver"), liver)
    world["worker"].results.append(only(labels, "Liver"))
    world["controller"].start_refine(CHOICES)
    while world["controller"].poll():
        pass
    assert world["finished"][-1][0], world["finished"][-1]
    sent = world["worker"].prompts[-1]
    assert [s.name for s in sent.segments] == ["Liver"]
    assert np.array_equal(sent.volume.array[t] == 1, liver[t])  # every voxel the user drew there
