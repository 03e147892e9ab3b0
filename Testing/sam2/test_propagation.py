"""Invariants of the SAM2 core that hold with any weights (real sam2 code, random weights)."""

import numpy as np
import pytest
import torch

from phantoms import OBLIQUE, RAS_FLIP, TEST_CONFIG, TEST_IMAGE_SIZE, phantom
from SAM2FewShotLib.common.context import RunContext
from SAM2FewShotLib.common.errors import Cancelled, InputError
from SAM2FewShotLib.methods.propagate import prompts_from_labels, segment_propagate
from SAM2FewShotLib.sam2.build import build_video_predictor
from SAM2FewShotLib.sam2.propagation import Prompt, labels_from_logits, propagate
from SAM2FewShotLib.sam2.session import VolumeSession


def _only_slices(session, labels, keep):
    arr = np.zeros_like(labels.volume.array)
    dst, src = session.slices_of(arr), session.slices_of(labels.volume.array)
    for t in keep:
        dst[t] = src[t]
    return labels.with_array(arr)


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE, RAS_FLIP], ids=["lps", "oblique", "ras"])
def test_mask_prompt_round_trip_geometry_and_visits(random_predictor, direction):
    img, truth = phantom(direction=direction)
    s = VolumeSession(random_predictor, img)
    mid = s.num_slices // 2
    prompts = prompts_from_labels(s, _only_slices(s, truth, [mid]))
    out, report = segment_propagate(s, prompts, truth.segments)
    # geometry of the output is the query's, voxel for voxel
    assert out.volume.same_grid(img, tol=0) and out.volume.array.shape == img.array.shape
    # the prompted slice comes back exactly as it was given
    given = s.slices_of(truth.volume.array)[mid]
    assert np.array_equal(s.slices_of(out.volume.array)[mid], given)
    # the model's own output on that slice is near-equal (mask passes through its low-res logits)
    own = report_model_mask(s, prompts, truth)
    for o, v in enumerate([1, 2]):
        a, b = own[o], given == v
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85
    # every slice before and after the prompt was visited, in the right pass
    visited = [(e["visited"]["forward"], e["visited"]["backward"]) for e in report["slices"]]
    assert all(b for f, b in visited[:mid]) and all(f for f, b in visited[mid + 1:])
    assert all(e["objects"]["structure_1"]["object_score"] is not None for e in report["slices"])
    assert report["slices"][mid]["objects"]["structure_1"]["source"] == "mask prompt"
    assert report["slices"][0]["objects"]["structure_1"]["source"] == f"backward from slice {mid}"
    assert {s.name for s in out.segments} == {"structure_1", "structure_2"}


def report_model_mask(session, prompts, truth):
    result = propagate(session.predictor, session.frames, prompts, cache=session.cache)
    return result.prompt_model_masks[prompts[0].frame]


def test_two_runs_with_the_same_seed_are_identical():
    img, truth = phantom(seed=3)
    results = []
    for _ in range(2):
        p = build_video_predictor(TEST_CONFIG, image_size=TEST_IMAGE_SIZE, seed=7)
        s = VolumeSession(p, img)
        out, rep = segment_propagate(s, prompts_from_labels(s, _only_slices(s, truth, [4])), truth.segments)
        results.append((out.volume.array, [e["objects"]["structure_2"]["object_score"] for e in rep["slices"]]))
    assert np.array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def test_several_prompted_slices_take_the_nearer_prompt_and_features_are_reused(random_predictor):
    img, truth = phantom(shape_kji=(16, 32, 32))
    s = VolumeSession(random_predictor, img)
    prompts = prompts_from_labels(s, _only_slices(s, truth, [4, 11]), values=[1])
    _, rep = segment_propagate(s, prompts, truth.segments)
    src = [e["objects"]["structure_1"]["source"] for e in rep["slices"]]
    assert src[4] == src[11] == "mask prompt"
    assert src[5] == "forward from slice 4" and src[10] == "backward from slice 11"
    assert src[2] == "backward from slice 4" and src[14] == "forward from slice 11"
    assert src[7] == "forward from slice 4" and src[8] == "backward from slice 11"
    assert rep["timing"]["frames_encoded"] == 16
    _, again = segment_propagate(s, prompts, truth.segments)  # warm: no frame encoded twice
    assert again["timing"]["frames_encoded"] == 0
    assert [e["objects"]["structure_1"]["voxels"] for e in again["slices"]] == \
        [e["objects"]["structure_1"]["voxels"] for e in rep["slices"]]


def test_box_and_point_prompts_for_several_objects(random_predictor):
    img, truth = phantom()
    s = VolumeSession(random_predictor, img)
    prompts = [
        Prompt(frame=3, obj_id=1, box=(10, 8, 30, 20)),
        Prompt(frame=8, obj_id=2, points=np.array([[20.0, 25.0], [5.0, 5.0]]), point_labels=np.array([1, 0])),
    ]
    out, rep = segment_propagate(s, prompts, truth.segments)
    assert rep["slices"][3]["objects"]["structure_1"]["source"] == "box prompt"
    assert rep["slices"][8]["objects"]["structure_2"]["source"] == "points prompt"
    assert rep["slices"][0]["objects"]["structure_2"]["source"] == "backward from slice 8"
    assert set(np.unique(out.volume.array)) <= {0, 1, 2}


def test_overlaps_go_to_the_higher_logit():
    logits = torch.tensor([[[2.0, -1.0], [0.5, 3.0]], [[1.0, 4.0], [0.7, -2.0]]])
    assert labels_from_logits(logits, [3, 7]).tolist() == [[3, 7], [7, 3]]
    assert labels_from_logits(-logits.abs(), [3, 7]).tolist() == [[0, 0], [0, 0]]


def test_frame_range_limits_the_passes(random_predictor):
    img, truth = phantom()
    s = VolumeSession(random_predictor, img)
    prompts = prompts_from_labels(s, _only_slices(s, truth, [6]), values=[1])
    out, rep = segment_propagate(s, prompts, truth.segments, RunContext(frame_range=(4, 8)))
    visited = [e["visited"]["forward"] or e["visited"]["backward"] for e in rep["slices"]]
    assert visited == [i in range(4, 9) for i in range(12)]
    assert not s.slices_of(out.volume.array)[[0, 1, 2, 3, 9, 10, 11]].any()


def test_bad_prompts_are_one_line_errors(random_predictor):
    img, truth = phantom()
    s = VolumeSession(random_predictor, img)
    empty = truth.with_array(np.zeros_like(truth.volume.array))
    with pytest.raises(InputError, match="no labelled voxel"):
        prompts_from_labels(s, empty)
    with pytest.raises(InputError, match="label value 5 does not exist"):
        prompts_from_labels(s, truth, values=[5])
    with pytest.raises(InputError, match="empty"):
        propagate(random_predictor, s.frames, [Prompt(2, 1, mask=np.zeros((40, 48), bool))])
    with pytest.raises(InputError, match="outside the volume"):
        propagate(random_predictor, s.frames, [Prompt(99, 1, box=(1, 1, 5, 5))])


def test_cancel_stops_the_run(random_predictor):
    img, truth = phantom()
    s = VolumeSession(random_predictor, img)
    calls = []
    with pytest.raises(Cancelled):
        propagate(random_predictor, s.frames, prompts_from_labels(s, _only_slices(s, truth, [6])),
                  context=RunContext(lambda *a: calls.append(a), lambda: len(calls) > 2))
    assert len(calls) == 3


def test_real_hippocampus_propagation(random_predictor, shared_data):
    import SimpleITK as sitk

    from SAM2FewShotLib.io.volume import LabelMap, Volume, default_segments

    d = shared_data / "msd_hippocampus"
    img = Volume.from_sitk(sitk.ReadImage(str(d / "hippocampus_015_img.nii.gz")))
    lab = Volume.from_sitk(sitk.ReadImage(str(d / "hippocampus_015_label.nii.gz")))
    truth = LabelMap(lab, default_segments([1, 2]))
    s = VolumeSession(random_predictor, img)
    area = (s.slices_of(lab.array) > 0).sum(axis=(1, 2))
    mid = int(np.argmax(area))
    out, rep = segment_propagate(s, prompts_from_labels(s, _only_slices(s, truth, [mid])), truth.segments)
    assert out.volume.same_grid(img, tol=0)
    assert np.array_equal(s.slices_of(out.volume.array)[mid], s.slices_of(lab.array)[mid])
    assert len(rep["slices"]) == s.num_slices and rep["timing"]["frames_encoded"] == s.num_slices


def test_mask_slices_choose_the_prompt_slices_and_an_erased_slice_stays_empty(random_predictor):
    """A refine lists each label's prompt slices; where the user erased a structure, it stays absent."""
    from SAM2FewShotLib.methods.propagate import Params, parse_mask_slices

    img, truth = phantom()
    s = VolumeSession(random_predictor, img)
    mid = s.num_slices // 2
    labels = _only_slices(s, truth, [mid, mid + 2])
    s.slices_of(labels.volume.array)[mid + 2][s.slices_of(labels.volume.array)[mid + 2] == 1] = 0  # 1 erased
    chosen = parse_mask_slices(f"1:{mid},{mid + 2};2:{mid}")
    prompts = prompts_from_labels(s, labels, mask_slices=chosen)
    assert sorted((p.frame, p.obj_id, p.erased) for p in prompts) == [(mid, 1, False), (mid, 2, False),
                                                                      (mid + 2, 1, True)]
    out, _ = segment_propagate(s, prompts, truth.segments)
    result = s.slices_of(out.volume.array)
    assert not (result[mid + 2] == 1).any()  # the erased slice is a prompt: label 1 absent there
    assert np.array_equal(result[mid], s.slices_of(labels.volume.array)[mid])
    default = prompts_from_labels(s, labels)  # without mask_slices: slices with voxels only
    assert sorted((p.frame, p.obj_id) for p in default) == [(mid, 1), (mid, 2), (mid + 2, 2)]
    for bad, message in (("1:x", "is not"), ("0:3", "labels are 1"), ("1:", "labels are 1")):
        with pytest.raises(InputError, match=message):
            Params(mask_slices=bad).check()
    with pytest.raises(InputError, match="outside"):
        prompts_from_labels(s, labels, mask_slices={1: [s.num_slices + 3]})
    with pytest.raises(InputError, match="is empty"):  # an empty mask not asked for is still refused
        propagate(random_predictor, s.frames, [Prompt(frame=mid, obj_id=1, mask=np.zeros(result[0].shape, bool))])


def test_the_slicing_axis_follows_the_plane_the_prompts_were_drawn_in():
    from SAM2FewShotLib.io.slicing import PromptPlanesError, drawn_axis, prompt_plane

    img, truth = phantom((24, 32, 32), spacing=(1.0, 1.0, 1.0))  # isotropic: spacing says nothing
    labels = truth.volume.array
    sagittal = np.zeros_like(labels)
    sagittal[:, :, [12, 20]] = labels[:, :, [12, 20]]
    axial = np.zeros_like(labels)
    axial[[8, 9, 10]] = labels[[8, 9, 10]]  # a slab of three adjacent slices is still axial
    assert drawn_axis(sagittal) == 2 and prompt_plane(img, sagittal) == "sagittal"
    assert drawn_axis(axial) == 0 and prompt_plane(img, axial) == "axial"
    assert drawn_axis(labels) is None and prompt_plane(img, labels) == "auto"  # solid 3D masks: no plane
    both = np.maximum(sagittal, axial)
    with pytest.raises(PromptPlanesError) as caught:
        drawn_axis(both)
    assert caught.value.axes == (0, 2)
    with pytest.raises(InputError, match=r"more than one plane \(axial and sagittal\).*--axis"):
        prompt_plane(img, both)
