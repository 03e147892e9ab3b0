"""The panel's "Review a cohort" steps headless: Slicer's real MRML (slicer-core) and a real cohort folder
made by a real `batch` run (registration: no model). Loading a case, its flagged slices in the world,
accept / reject / accept corrected written into the folder, and errors as one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mrml_oracle import exported, ijk_to_ras_of, require_mrml, segment_names
from phantoms import phantom
from SAM2FewShotLib.batch.lock import FolderLock
from SAM2FewShotLib.batch.manifest import LOCK
from SAM2FewShotLib.batch.review import case_files, flagged_slices
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume

slicer = require_mrml()

from SAM2FewShotLib.slicer import review as review_mod  # noqa: E402 - once slicer-core is known to be there
from SAM2FewShotLib.slicer.mrml_segments import register_segmentation_converters  # noqa: E402
from SAM2FewShotLib.slicer.review import CohortReview, corrected_labels, review_message  # noqa: E402

SHAPE = (8, 32, 32)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two queries segmented by registration from one labelled support: a cohort folder as batch leaves it."""
    root = tmp_path_factory.mktemp("review_cohort")
    for name, seed in (("a", 40), ("b", 41), ("s", 1)):  # the last one, s, is the labelled support
        image, labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=seed)
        write_volume(image, root / f"{name}.nrrd")
    write_labels(labels, root / "s_label.nii.gz")
    (root / "list.csv").write_text("query,id\n" + "".join(f"{root / n}.nrrd,{n}\n" for n in ("a", "b")))
    assert main(["batch", "--queries", str(root / "list.csv"), "--out", str(root / "out"), "--method",
                 "registration", "--support", str(root / "s.nrrd"), str(root / "s_label.nii.gz"), "-q"]) == 0
    return root / "out"


@pytest.fixture
def folder(cohort, tmp_path):
    """A private copy of the cohort: each test decides on its cases without touching the others'."""
    import shutil

    return Path(shutil.copytree(cohort, tmp_path / "out"))  # the manifest names files relative to its folder


@pytest.fixture
def scene():
    register_segmentation_converters()
    return slicer.vtkMRMLScene()


def _report(folder, case):
    return json.loads(case_files(folder, case).report.read_text())


def test_the_queue_lists_every_case_and_a_case_loads_with_named_coloured_segments(folder, scene):
    review = CohortReview.open(scene, folder)
    assert sorted(r.case for r in review.rows) == ["a", "b"] and {r.status for r in review.rows} == {"to review"}
    loaded = review.load("a")
    result = read_labels(case_files(folder, "a").result)
    assert loaded.volume_node.GetScene() is scene and loaded.segmentation_node.GetScene() is scene
    segmentation = loaded.segmentation_node.GetSegmentation()
    assert segment_names(loaded.segmentation_node) == [s.name for s in result.segments]
    for n, segment in enumerate(result.segments):
        assert np.allclose(segmentation.GetNthSegment(n).GetColor(), segment.color, atol=1e-3)
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    assert np.array_equal(exported(scene, loaded.segmentation_node, ids, loaded.volume_node), result.volume.array)
    assert np.allclose(ijk_to_ras_of(loaded.volume_node), result.volume.ijk_to_ras(), atol=1e-5)


def test_loading_another_case_replaces_only_the_previous_review_case_nodes(folder, scene):
    mine = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my own volume")
    my_segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segments")
    review = CohortReview.open(scene, folder)
    first = review.load("a")
    count = scene.GetNumberOfNodes()
    second = review.load("b")
    assert scene.GetNumberOfNodes() == count
    assert first.volume_node.GetScene() is None and first.segmentation_node.GetScene() is None
    assert scene.GetNodeByID(mine.GetID()) is mine and scene.GetNodeByID(my_segmentation.GetID()) is my_segmentation
    assert second.volume_node.GetAttribute(review_mod.CASE_ATTRIBUTE) == "b"
    scene.RemoveNode(second.segmentation_node)  # the user deleted it: unloading leaves the rest alone
    review.unload()
    assert scene.GetNodeByID(mine.GetID()) is mine and scene.GetNodesByClass("vtkMRMLScalarVolumeNode") \
        .GetNumberOfItems() == 1


def test_next_flagged_slice_cycles_through_the_report_slices_at_their_world_centres(folder, scene):
    review = CohortReview.open(scene, folder)
    case = review.load("a")
    report = _report(folder, "a")
    flagged = flagged_slices(report)
    if not flagged:  # a registration run flags slices only where it was unsure: make the report say so
        case.flagged = flagged = [2, 5]
    # a registration report names no slicing axis: the acquisition (thick, k) axis, as a run would slice
    axis = {"k": 0, "j": 1, "i": 2}[report["session"]["axis"]] if "session" in report else 0
    m = ijk_to_ras_of(case.volume_node)
    seen = [review.next_flagged() for _ in range(len(flagged) + 1)]
    assert [index for index, _ in seen] == flagged + flagged[:1]
    for index, ras in seen:
        centre = [(n - 1) / 2 for n in SHAPE]
        centre[axis] = index
        k, j, i = centre
        assert np.allclose(ras, (m @ [i, j, k, 1.0])[:3], atol=1e-6)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    assert red.SetOrientationToAxial()
    assert review.show_next_flagged() == f"Case a: flagged slice {flagged[1 % len(flagged)]} (2 of {len(flagged)})."
    assert np.allclose([red.GetSliceToRAS().GetElement(r, 3) for r in range(3)], seen[1][1])


def test_a_jump_centres_the_view_of_the_slicing_plane_and_moves_the_others_through_the_point(scene):
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)  # as Slicer's slice logic does
    red, green = (scene.AddNewNodeByClass("vtkMRMLSliceNode") for _ in range(2))
    red.SetLayoutName("Red")
    green.SetLayoutName("Green")
    assert red.SetOrientationToAxial() and green.SetOrientationToCoronal()
    centred = review_mod.jump_to(scene, (10.0, -20.0, 33.0), np.array([0.0, 0.0, 1.0]))
    assert centred == ["Red"]
    assert np.allclose([red.GetSliceToRAS().GetElement(r, 3) for r in range(3)], (10.0, -20.0, 33.0))
    assert green.GetSliceOffset() == pytest.approx(-20.0)  # the coronal view passes through the point


def test_accept_reject_and_accept_corrected_are_written_into_the_cohort_folder(folder, scene):
    review = CohortReview.open(scene, folder)
    review.load("b")
    assert review.decide("rejected") == "Case b: rejected."
    assert review.row("b").status == "rejected"
    case = review.load("a")
    with pytest.raises(InputError, match="not accepted yet"):
        review.library_case()
    segmentation = case.segmentation_node.GetSegmentation()
    first_id = segmentation.GetNthSegmentID(0)
    edited = slicer.vtkOrientedImageData()  # the reviewer erases the first segment on slice 3 and paints a square
    mask = exported(scene, case.segmentation_node, [first_id], case.volume_node) > 0
    mask[3] = False
    mask[3, 2:6, 2:6] = True
    _set_segment(case.segmentation_node, first_id, mask, case.volume_node, edited)
    message = review.accept_corrected()
    assert message.startswith("Case a: correction saved") and review.row("a").status == "corrected"
    files = case_files(folder, "a")
    saved = read_labels(files.corrected)
    original = read_labels(files.result)
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    now = exported(scene, case.segmentation_node, ids, case.volume_node)  # values 1..N in segment order
    expected = np.zeros_like(now)
    for n, segment in enumerate(original.segments, start=1):
        expected[now == n] = segment.value
    assert np.array_equal(saved.volume.array, expected)
    assert [s.name for s in saved.segments] == [s.name for s in original.segments]
    image, labels, name = review.library_case()
    assert (image, labels, name) == (files.query, files.corrected, "a")
    again = review.load("a")  # a case with a correction loads the corrected labels
    reloaded = again.segmentation_node.GetSegmentation()
    ids = [reloaded.GetNthSegmentID(n) for n in range(reloaded.GetNumberOfSegments())]
    assert np.array_equal(exported(scene, again.segmentation_node, ids, again.volume_node), now)


def test_corrected_labels_keep_the_result_values_by_name_and_number_new_segments_after_them(folder, scene):
    review = CohortReview.open(scene, folder)
    case = review.load("a")
    segmentation = case.segmentation_node.GetSegmentation()
    order = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    segmentation.SetSegmentIndex(order[-1], 0)  # the reviewer reordered the segments and added one
    new_id = segmentation.AddEmptySegment("extra", "Extra", (1.0, 0.0, 0.0))
    mask = np.zeros(SHAPE, dtype=bool)
    mask[0, :2, :2] = True
    _set_segment(case.segmentation_node, new_id, mask, case.volume_node, slicer.vtkOrientedImageData())
    labels = corrected_labels(case.segmentation_node, case.labels)
    top = max(case.labels.values)
    assert {s.name: s.value for s in labels.segments} == {**{s.name: s.value for s in case.labels.segments},
                                                          "Extra": top + 1}
    assert np.all(labels.volume.array[0, :2, :2] == top + 1)


def test_a_decision_while_a_batch_run_holds_the_folder_is_one_sentence_and_nothing_is_written(folder, scene):
    review = CohortReview.open(scene, folder)
    review.load("a")
    with FolderLock(folder, LOCK), pytest.raises(InputError) as caught:
        review.decide("accepted")
    sentence = review_message(caught.value)
    assert sentence.startswith("Not saved: the cohort folder is in use by a batch run") and "\n" not in sentence
    assert "--" not in sentence and "sam2fewshot" not in sentence
    assert review.refresh() and review.row("a").status == "to review"
    assert review_message(InputError("x holds no cohort manifest (manifest.json): give the --out folder")) == \
        "This folder holds no batch results: choose the output folder of a batch run."
    with pytest.raises(InputError, match="select a case"):
        CohortReview.open(scene, folder).next_flagged()


def _set_segment(seg_node, segment_id, mask, reference_node, image):
    """The Segment Editor's way of changing a segment: a binary labelmap on the reference grid."""
    from vtkmodules.util.numpy_support import numpy_to_vtk

    k, j, i = mask.shape
    image.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True))
    import vtk

    matrix = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
