"""Invariants of the SAM2 core that hold with any weights (real sam2 code, random weights)."""

import numpy as np
import pytest
import torch

from conftest import TEST_CONFIG, TEST_IMAGE_SIZE
from phantoms import OBLIQUE, RAS_FLIP, phantom
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
    out, rep = segment_propagate(s, prompts, truth.segments, frame_range=(4, 8))
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
                  should_cancel=lambda: len(calls) > 2, progress=lambda *a: calls.append(a))
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
