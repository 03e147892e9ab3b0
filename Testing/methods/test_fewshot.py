"""Matched support (few-shot): the three schemes, multi-structure runs on real data, bad input."""

import numpy as np
import pytest

from phantoms import phantom
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap, Segment, Volume
from SAM2FewShotLib.io.volume_io import read_labels, read_volume
from SAM2FewShotLib.methods.common import largest_run
from SAM2FewShotLib.methods.matched_support import FewShotParams, segment_fewshot
from SAM2FewShotLib.sam2.session import VolumeSession

FAST = dict(augmentations=2, slices_per_structure=3, top_k=2)


@pytest.mark.parametrize("scheme", ["pair", "video", "video+memory"])
def test_each_scheme_segments_every_structure_with_a_report(small_predictor, scheme):
    query, _ = phantom(seed=1)
    support = phantom(seed=2, shape_kji=(14, 44, 40))
    s = VolumeSession(small_predictor, query)
    out, rep = segment_fewshot(s, [support], FewShotParams(scheme=scheme, features="intensity", **FAST))
    assert out.volume.same_grid(query, tol=0)
    assert [(g.value, g.name) for g in out.segments] == [(1, "structure_1"), (2, "structure_2")]
    assert set(np.unique(out.volume.array)) <= {0, 1, 2}
    assert rep["fewshot"]["scheme"] == scheme and rep["fewshot"]["support_entries"] == 2 * 3 * 2
    for e in rep["slices"]:
        for name in ("structure_1", "structure_2"):
            obj = e["objects"][name]
            assert obj["support_case"] == 0 and isinstance(obj["support_slice"], int)
            assert -1.0 <= obj["similarity"] <= 1.0 and obj["object_score"] is not None
            assert set(obj["augmentation"]) >= {"angle", "scale", "brightness", "gamma"}
            assert len(obj["memories"]) == (1 if scheme == "pair" else 2)
    both = [e["visited"]["forward"] and e["visited"]["backward"] for e in rep["slices"]]
    assert all(both) == (scheme == "video+memory")


def test_sam2_features_reuse_the_query_encoding(small_predictor):
    query, _ = phantom(seed=1)
    support = phantom(seed=2)
    s = VolumeSession(small_predictor, query)
    _, rep = segment_fewshot(s, [support], FewShotParams(scheme="video", features="sam2", **FAST))
    n_entries = rep["fewshot"]["support_entries"]
    # every query slice and every support entry went through the encoder exactly once
    assert rep["timing"]["frames_encoded"] == s.num_slices + n_entries
    _, again = segment_fewshot(s, [support], FewShotParams(scheme="video", features="sam2", **FAST))
    assert again["timing"]["frames_encoded"] == 0  # the query and the same supports stay warm


def test_query_identical_to_support_matches_its_own_slices(small_predictor):
    image, labels = phantom(seed=4)
    s = VolumeSession(small_predictor, image)
    _, rep = segment_fewshot(s, [(image, labels)], FewShotParams(
        scheme="pair", features="intensity", augmentations=1, slices_per_structure=50, top_k=1))
    for e in rep["slices"]:
        obj = e["objects"]["structure_1"]
        if s.slices_of(labels.volume.array)[e["slice"]].any():
            assert obj["support_slice"] == e["slice"] and obj["similarity"] > 0.999


def test_largest_run_keeps_the_longest_contiguous_extent():
    lab = np.zeros((8, 2, 2), np.int32)
    lab[[0, 2, 3, 4, 6], 0, 0] = 1
    lab[:, 1, 1] = 2
    out = largest_run(lab, 1)
    assert out[:, 0, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0] and (out[:, 1, 1] == 2).all()


def test_hippocampus_two_structures(small_predictor, shared_data):
    d = shared_data / "msd_hippocampus"
    query = read_volume(d / "hippocampus_015_img.nii.gz")
    support = (read_volume(d / "hippocampus_184_img.nii.gz"), read_labels(d / "hippocampus_184_label.nii.gz"))
    s = VolumeSession(small_predictor, query)
    out, rep = segment_fewshot(s, [support], FewShotParams(scheme="video+memory", features="sam2", **FAST))
    assert out.volume.same_grid(query, tol=0) and out.volume.array.shape == query.array.shape
    assert [(g.value, g.name) for g in out.segments] == [(1, "label_1"), (2, "label_2")]
    assert len(rep["slices"]) == s.num_slices


def test_totalsegmentator_ct_several_organs(small_predictor, shared_data):
    d = shared_data / "totalsegmentator_examples"
    image = read_volume(d / "example_ct_sm.nii.gz")
    full = read_labels(d / "example_ct_sm_seg.nii.gz", reference=image)
    organs = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
    arr = np.where(np.isin(full.volume.array, list(organs)), full.volume.array, 0).astype(np.uint8)
    support = LabelMap(image.with_array(arr),
                       tuple(Segment(v, n, (0.1 * v, 0.5, 0.5)) for v, n in organs.items()))
    query = Volume(np.roll(image.array, 3, axis=2), image.spacing, image.origin, image.direction)
    s = VolumeSession(small_predictor, query)
    out, rep = segment_fewshot(s, [(image, support)], FewShotParams(scheme="video", features="intensity", **FAST))
    assert s.normalization.mode == "window"  # CT detected: a HU window feeds the model
    assert out.volume.same_grid(query, tol=0)
    assert ([(g.value, g.name, g.color) for g in out.segments]
            == [(v, n, (0.1 * v, 0.5, 0.5)) for v, n in organs.items()])
    assert set(np.unique(out.volume.array)) <= {0, 1, 2, 3, 5}
    assert set(rep["slices"][len(rep["slices"]) // 2]["objects"]) == set(organs.values())


def test_bad_supports_are_clear_errors(small_predictor):
    query, _ = phantom(seed=1)
    image, labels = phantom(seed=2)
    s = VolumeSession(small_predictor, query)
    empty = labels.with_array(np.zeros_like(labels.volume.array))
    with pytest.raises(InputError, match="no labelled voxel"):
        segment_fewshot(s, [(image, empty)], FewShotParams(**FAST))
    renamed = LabelMap(labels.volume, (Segment(1, "structure_2"), Segment(2, "structure_1")))
    with pytest.raises(InputError, match="structure name 'structure_2' has value 2 in one support and 1 in support 2"):
        segment_fewshot(s, [(image, labels), (image, renamed)], FewShotParams(**FAST))
    with pytest.raises(InputError, match="segment names must be unique"):
        LabelMap(labels.volume, (Segment(1, "liver"), Segment(2, "liver")))
    with pytest.raises(InputError, match="3D"):
        Volume(image.array[0], image.spacing, image.origin)  # a 2D support never becomes a volume
    with pytest.raises(InputError, match="unknown scheme"):
        segment_fewshot(s, [(image, labels)], FewShotParams(scheme="magic"))
