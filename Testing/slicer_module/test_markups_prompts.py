"""Markups points and ROIs as Propagate's prompts, headless on Slicer's real MRML (slicer-core): world
positions to the exact voxel indices of the engine's prompts file (oblique and flipped volumes, parent
transforms), include/exclude, the segment rules, a ROI's box and slice bounds, the one-sentence errors,
and one run through the RunController with the real worker (random weights, 128 px)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mrml_oracle import linear_transform, require_mrml
from phantoms import OBLIQUE, RAS_FLIP, phantom, rotation
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap
from SAM2FewShotLib.methods.propagate import Params, parse_slice_bounds, read_prompts_file
from SAM2FewShotLib.methods.registry import get_method
from SAM2FewShotLib.slicer.panel import PanelChoices

slicer = require_mrml()

from test_slicer_runs import Recorder, make_controller, wait  # noqa: E402 - its helpers only

from SAM2FewShotLib.slicer import scene_io  # noqa: E402
from SAM2FewShotLib.slicer.markups_prompts import markups_prompts  # noqa: E402
from SAM2FewShotLib.slicer.mrml_segments import (  # noqa: E402
    add_labels_to_segmentation,
    labels_from_segmentation,
    register_segmentation_converters,
)
from SAM2FewShotLib.slicer.mrml_volume import volume_from_node, volume_to_node  # noqa: E402
from SAM2FewShotLib.slicer.segment_slices import read_segment, write_slice  # noqa: E402

SHAPE = (8, 32, 32)  # k, j, i: 3 mm slices along k, the slicing (auto) axis
PROPAGATE = get_method("propagate")
CHOICES = PanelChoices(method="propagate", device="cpu", random_weights=True, image_size=128)


@pytest.fixture
def scene():
    register_segmentation_converters()
    return slicer.vtkMRMLScene()


def world_of(volume, ijk) -> list[float]:
    """The RAS world position of continuous voxel coordinates (i, j, k) of ``volume``."""
    return (volume.ijk_to_ras() @ [*ijk, 1.0])[:3].tolist()


def point_list(scene, name, positions, labels=None, selected=None):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for n, ras in enumerate(positions):
        node.AddControlPointWorld(ras, labels[n] if labels else f"{name}-{n + 1}")
        if selected is not None:
            node.SetNthControlPointSelected(n, selected[n])
    return node


def roi(scene, name, centre_ras, size_mm):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    node.SetCenterWorld(*centre_ras)
    node.SetSize(*size_mm)
    return node


@pytest.fixture
def query(scene):
    image, truth = phantom(SHAPE, spacing=(1.0, 1.0, 3.0))
    node = volume_to_node(image, scene, "query")
    return dict(node=node, volume=volume_from_node(node), segments=truth.segments, truth=truth, image=image)


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE, RAS_FLIP], ids=["axial", "oblique", "flipped"])
def test_a_point_becomes_the_voxel_it_lies_in(scene, direction):
    image, truth = phantom(SHAPE, spacing=(0.8, 0.9, 3.0), direction=direction)
    volume = volume_from_node(volume_to_node(image, scene, "query"))
    voxels = [(3, 5, 1), (30, 28, 6), (0, 31, 7)]
    offsets = [(0.4, -0.3, 0.2), (-0.45, 0.45, -0.4), (0.0, -0.49, 0.1)]  # anywhere inside the voxel
    positions = [world_of(volume, np.add(v, d)) for v, d in zip(voxels, offsets, strict=True)]
    points = point_list(scene, "structure_1", positions)
    got = markups_prompts(volume, "query", truth.segments, 0, points)
    assert [e["points_ijk"] for e in got.as_json()["prompts"]] == [[[3, 5, 1]], [[30, 28, 6]], [[0, 31, 7]]]
    assert got.slices() == {1: frozenset({1, 6, 7})} and got.bounds == {}


def test_under_parent_transforms_the_world_positions_count(scene):
    """The volume under a rotation (read hardened), the point list under another: both in world terms."""
    image, truth = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), direction=OBLIQUE)
    node = volume_to_node(image, scene, "query")
    to_parent = np.eye(4)
    to_parent[:3, :3], to_parent[:3, 3] = rotation("x", 30), (5.0, -2.0, 7.5)
    node.SetAndObserveTransformNodeID(linear_transform(scene, to_parent).GetID())
    volume = volume_from_node(node, harden=True)
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -4.0, 6.0)
    points = point_list(scene, "structure_2", [])
    points.SetAndObserveTransformNodeID(linear_transform(scene, shift).GetID())
    in_world = world_of(volume, (12.2, 20.3, 5.1))
    points.AddControlPoint((np.linalg.inv(shift) @ [*in_world, 1.0])[:3].tolist())  # node coordinates
    got = markups_prompts(volume, "query", truth.segments, 0, points)
    assert got.as_json() == {"prompts": [{"label": 2, "points_ijk": [[12, 20, 5]], "point_labels": [1]}]}


def test_selected_points_include_unselected_exclude_and_names_choose_the_segment(query):
    v = query["volume"]
    points = point_list(query["node"].GetScene(), "structure_1",
                        [world_of(v, (10, 10, 4)), world_of(v, (20, 12, 4)), world_of(v, (12, 22, 2))],
                        labels=["F-1", "Structure_2 ", "F-3"], selected=[True, False, True])
    got = markups_prompts(v, "query", query["segments"], 0, points)
    assert got.as_json()["prompts"] == [
        {"label": 1, "points_ijk": [[12, 22, 2]], "point_labels": [1]},  # the list's name: structure_1
        {"label": 1, "points_ijk": [[10, 10, 4]], "point_labels": [1]},
        {"label": 2, "points_ijk": [[20, 12, 4]], "point_labels": [0]},  # its own label names structure_2 (any case)
    ]
    one = markups_prompts(v, "query", query["segments"][1:], 0, point_list(query["node"].GetScene(), "F",
                                                                            [world_of(v, (1, 2, 3))]))
    assert one.as_json()["prompts"] == [{"label": 2, "points_ijk": [[1, 2, 3]], "point_labels": [1]}]


def test_a_roi_is_a_box_on_its_centre_slice_and_its_extent_bounds_its_segment(query):
    v, scene = query["volume"], query["node"].GetScene()
    # i 10.5..19.5 and j 8.5..15.5 voxels (1 mm), k 2.95..5.45 slices (3 mm): the voxels with centres inside
    box = roi(scene, "structure_1", world_of(v, (15.0, 12.0, 4.2)), (9.0, 7.0, 7.5))
    points = point_list(scene, "structure_1", [world_of(v, (14, 12, 4)), world_of(v, (2, 2, 0))], labels=["a", "b"])
    points.SetNthControlPointLabel(1, "structure_2")
    got = markups_prompts(v, "query", query["segments"], 0, points, [box])
    assert got.as_json()["prompts"] == [
        {"label": 1, "box_ijk": [[11, 9, 4], [19, 15, 4]], "points_ijk": [[14, 12, 4]], "point_labels": [1]},
        {"label": 2, "points_ijk": [[2, 2, 0]], "point_labels": [1]},
    ]
    assert got.bounds == {1: (3, 5)} and scene_io.RunInputs(v, slice_bounds=got.bounds).slice_bounds_text() == "1:3-5"
    assert got.slices() == {1: frozenset({4}), 2: frozenset({0})}
    edge = roi(scene, "structure_1", world_of(v, (30.0, -3.0, 7.0)), (6.0, 10.0, 12.0))  # partly outside: clipped
    clipped = markups_prompts(v, "query", query["segments"], 0, None, [edge])
    assert clipped.as_json()["prompts"] == [{"label": 1, "box_ijk": [[27, 0, 7], [31, 2, 7]]}]
    assert clipped.bounds == {1: (5, 7)}
    shift = np.eye(4)
    shift[:3, 3] = (0.0, 0.0, 6.0)  # two slices up, through its transform
    box.SetAndObserveTransformNodeID(linear_transform(scene, shift).GetID())
    moved = markups_prompts(v, "query", query["segments"], 0, None, [box])
    assert moved.as_json()["prompts"] == [{"label": 1, "box_ijk": [[11, 9, 6], [19, 15, 6]]}]
    assert moved.bounds == {1: (5, 7)}


def test_the_slicing_plane_decides_the_box_and_the_engine_reads_the_file(query, tmp_path):
    """Through the scene as the panel reads it (segments without voxels name the prompts), sliced
    coronally as chosen under Advanced; the engine reads the file back onto the same slices."""
    scene, v = query["node"].GetScene(), query["volume"]
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prompts")
    for s in query["segments"]:
        segmentation.GetSegmentation().AddEmptySegment(s.name, s.name, list(s.color))
    box = roi(scene, "structure_2", world_of(v, (20.0, 16.0, 4.0)), (6.0, 4.2, 6.0))
    points = point_list(scene, "structure_2", [world_of(v, (21, 16, 5))], selected=[False])
    inputs = scene_io.gather_inputs(PROPAGATE, query["node"], segmentation, None, None, None, points, [box],
                                    "coronal")
    assert inputs.markups.axis == 1 and inputs.markups.bounds == {2: (14, 18)}
    assert inputs.markups.as_json()["prompts"] == [
        {"label": 2, "box_ijk": [[17, 16, 3], [23, 16, 5]], "points_ijk": [[21, 16, 5]], "point_labels": [0]}]
    assert scene_io.prompt_slices_of(inputs, 1) == {1: frozenset(), 2: frozenset({16})}
    path = scene_io.write_prompts(inputs, tmp_path)
    assert json.loads(path.read_text()) == inputs.markups.as_json()
    (prompt,) = read_prompts_file(path, 1, v.array.shape)
    assert (prompt.frame, prompt.obj_id, tuple(prompt.box)) == (16, 2, (17.0, 3.0, 23.0, 5.0))
    assert prompt.points.tolist() == [[21.0, 5.0]] and prompt.point_labels.tolist() == [0]


def scene_error(query, make) -> str:
    scene, v = query["node"].GetScene(), query["volume"]
    points, rois = make(scene, v)
    with pytest.raises(InputError) as caught:
        markups_prompts(v, "query", query["segments"], 0, points, rois)
    return str(caught.value)


@pytest.mark.parametrize("make, message", [
    (lambda s, v: (point_list(s, "structure_1", [world_of(v, (32.6, 3, 3))]), []),
     "point 'structure_1-1' of 'structure_1' lies outside the volume 'query'"),
    (lambda s, v: (point_list(s, "structure_1", []), []),
     "the point list 'structure_1' has no placed point: place some, or choose no point list"),
    (lambda s, v: (None, [roi(s, "structure_1", world_of(v, (40, 10, 4)), (4, 4, 4))]),
     "the ROI 'structure_1' does not intersect the volume 'query'"),
    (lambda s, v: (None, [s.AddNewNodeByClass("vtkMRMLMarkupsROINode", "structure_1")]),
     "the ROI 'structure_1' is not placed yet"),
    (lambda s, v: (None, [roi(s, "structure_1", world_of(v, (9, 9, 4)), (4, 4, 4)),
                          roi(s, "Structure_1", world_of(v, (19, 9, 4)), (4, 4, 4))]),
     "the ROIs 'structure_1' and 'Structure_1' both prompt segment 'structure_1': use one ROI per segment"),
    (lambda s, v: (point_list(s, "structure_1", [world_of(v, (9, 9, 1))]),
                   [roi(s, "structure_1", world_of(v, (9, 9, 4)), (4, 4, 4))]),
     "point 'structure_1-1' of 'structure_1' lies on slice 1, outside the slices 4-4 of the ROI 'structure_1' "
     "for segment 'structure_1'"),
    (lambda s, v: (point_list(s, "F", [world_of(v, (9, 9, 1))]), []),
     "point 'F-1' of 'F' names none of the checked segments ('structure_1', 'structure_2'): name it after its "
     "segment, or check one segment only"),
], ids=["point outside", "empty list", "roi outside", "roi not placed", "two rois", "outside the roi", "no segment"])
def test_each_problem_is_one_sentence(query, make, message):
    assert scene_error(query, make) == message


def test_a_drawn_mask_and_points_on_one_slice_are_refused(query):
    scene, v, truth = query["node"].GetScene(), query["volume"], query["truth"]
    drawn = np.zeros_like(truth.volume.array)
    drawn[4] = truth.volume.array[4]
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prompts")
    ids = add_labels_to_segmentation(segmentation, LabelMap(truth.volume.with_array(drawn), truth.segments),
                                     query["node"])
    clash = point_list(scene, "structure_1", [world_of(v, (16, 10, 4))])
    with pytest.raises(InputError, match="^segment 'structure_1' has a drawn mask and points or a box on slice 4: "
                                         "use one or the other on a slice$"):
        scene_io.gather_inputs(PROPAGATE, query["node"], segmentation, ids, prompt_points=clash)
    elsewhere = point_list(scene, "structure_1", [world_of(v, (16, 10, 2))])
    inputs = scene_io.gather_inputs(PROPAGATE, query["node"], segmentation, ids, prompt_points=elsewhere)
    assert scene_io.prompt_slices_of(inputs, 0) == {1: frozenset({2, 4}), 2: frozenset({4})}  # masks and points


def test_the_engine_parameter_of_slice_bounds():
    """Parsed and checked; with every prompted label bounded, propagation runs over their union only."""
    from SAM2FewShotLib.common.context import RunContext
    from SAM2FewShotLib.methods.propagate import _bounded
    from SAM2FewShotLib.sam2.conditioning import Prompt

    assert parse_slice_bounds("1:3-5;2:7") == {1: (3, 5), 2: (7, 7)} and parse_slice_bounds(" ") is None
    for bad in ("1:5-3", "0:1-2", "1:1-2;1:3-4", "a:1-2", "1:-1-2"):
        with pytest.raises(InputError, match="slice_bounds"):
            Params(slice_bounds=bad).check()
    bounds, prompts = {1: (3, 5), 2: (7, 9)}, [Prompt(4, 1, box=(0, 0, 1, 1)), Prompt(8, 2, box=(0, 0, 1, 1))]
    assert _bounded(RunContext(), prompts, bounds, 20).frame_range == (3, 9)
    assert _bounded(RunContext(frame_range=(0, 8)), prompts, bounds, 20).frame_range == (3, 8)
    assert _bounded(RunContext(), prompts[:1] + [Prompt(12, 3, box=(0, 0, 1, 1))], bounds, 20).frame_range is None
    with pytest.raises(InputError, match="^label 2 has a prompt on slice 8, outside its slice bounds 3..5$"):
        _bounded(RunContext(), prompts, {2: (3, 5)}, 20)


def test_points_and_a_roi_propagate_through_the_worker_and_the_roi_bounds_its_segment(query):
    """A point on slice 2 prompts structure_2; a ROI spanning slices 3-5 prompts structure_1 (box on slice 4):
    structure_1 has no voxel outside 3-5, the point's slice has structure_2, names come from the segments."""
    scene, v, truth = query["node"].GetScene(), query["volume"], query["truth"]
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prompts")
    for s in truth.segments:
        segmentation.GetSegmentation().AddEmptySegment(s.name, s.name, list(s.color))
    inside = np.argwhere(truth.volume.array[2] == 2).mean(axis=0)  # (j, i) of structure_2 on slice 2
    points = point_list(scene, "structure_2", [world_of(v, (inside[1], inside[0], 2))])
    k, j, i = np.nonzero(truth.volume.array == 1)
    box = roi(scene, "structure_1", world_of(v, ((i.min() + i.max()) / 2, (j.min() + j.max()) / 2, 4.0)),
              (i.max() - i.min() + 2.0, j.max() - j.min() + 2.0, 7.5))
    recorder = Recorder()
    controller = make_controller(scene, recorder)
    try:
        controller.start_run(CHOICES, query["node"], segmentation, None, prompt_points=points,
                             prompt_boxes=[box])
        wait(controller, timeout=120)
        assert recorder.finished[-1][0], recorder.finished
        last = controller.last
        applied = labels_from_segmentation(last.output_node, query["image"], last.segment_ids).volume.array
        refined = refine_with_a_slice_drawn_outside_the_roi(controller, recorder, query, last)
    finally:
        controller.shutdown()
    output = last.output_node
    assert [output.GetSegmentation().GetSegment(i).GetName() for i in last.segment_ids] == ["structure_1",
                                                                                          "structure_2"]
    assert not (applied[[0, 1, 2, 6, 7]] == 1).any()  # structure_1 only within its ROI's slices
    assert (applied[4] == 1).any()  # its box's slice (random weights give it a positive object score everywhere)
    assert (applied[2] == 2).any()  # the point's slice has structure_2
    prompted = {s.name: sorted(last.prompt_slices[i]) for s, i in zip(truth.segments, last.segment_ids, strict=True)}
    assert prompted == {"structure_1": [4], "structure_2": [2]}
    sources = {t["slice"]: t["objects"]["structure_1"]["source"] for t in last.report["slices"]}
    assert sources[0] == sources[7] == "outside its slice bounds" and sources[4] == "box prompt"
    assert sources[2] == "outside its slice bounds" and sources[3].startswith("backward from slice 4")
    assert last.slice_bounds == {last.segment_ids[0]: (3, 5)}
    assert not refined[[0, 1, 2, 7]].any()  # Refine keeps the ROI's bounds, widened to the drawn slice 6
    drawn = np.zeros(SHAPE[1:], bool)
    drawn[10:16, 10:16] = True  # the user's slice, kept (less what structure_2 holds: one label per voxel)
    assert refined[6].any() and not (refined[6] & ~drawn).any()
    assert controller.last.slice_bounds == {last.segment_ids[0]: (3, 6)}


def refine_with_a_slice_drawn_outside_the_roi(controller, recorder, query, last) -> np.ndarray:
    """structure_1 drawn by the user on slice 6, outside its ROI's slices 3-5, then Refine: structure_1 after."""
    output, ids = last.output_node, list(last.segment_ids)
    mask = np.zeros(SHAPE[1:], bool)
    mask[10:16, 10:16] = True
    write_slice(output, ids[0], query["volume"], 0, 6, mask)
    controller.start_refine(CHOICES)
    wait(controller, timeout=120)
    assert recorder.finished[-1][0], recorder.finished
    return read_segment(output, ids[0], query["image"])
