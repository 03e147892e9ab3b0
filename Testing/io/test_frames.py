"""Slicing axis, normalisation and model-input frames."""

import numpy as np
import pytest
import torch

from phantoms import OBLIQUE, phantom, rotation
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.normalization import CT_PRESETS, Normalization
from SAM2FewShotLib.io.slicing import from_slices, slicing_axis, to_slices
from SAM2FewShotLib.io.volume import Volume
from SAM2FewShotLib.sam2.frames import FrameSource, model_input


def test_auto_axis_is_the_largest_spacing():
    img, _ = phantom(spacing=(0.8, 0.9, 2.5))
    assert slicing_axis(img, "auto") == 0  # k has the thick slices
    img2, _ = phantom(spacing=(3.0, 0.9, 0.9))
    assert slicing_axis(img2, "auto") == 2  # i is the acquisition axis


def test_isotropic_auto_is_axial_and_forced_axes_follow_direction():
    # I runs along S, J along L, K along P: axial slices are along i.
    direction = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)
    img, _ = phantom(spacing=(1.0, 1.0, 1.0), direction=direction)
    assert slicing_axis(img, "auto") == 2
    assert slicing_axis(img, "axial") == 2
    assert slicing_axis(img, "sagittal") == 1
    assert slicing_axis(img, "coronal") == 0
    oblique, _ = phantom(spacing=(1.0, 1.0, 1.0), direction=OBLIQUE)
    assert slicing_axis(oblique, "axial") == 0
    with pytest.raises(InputError, match="unknown slicing axis"):
        slicing_axis(img, "diagonal")


def test_slices_round_trip_exactly():
    a = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    for axis in range(3):
        assert np.array_equal(from_slices(to_slices(a, axis), axis), a)


def test_ct_windows_and_custom_window():
    ct = np.array([-1000.0, -150.0, 50.0, 250.0, 3000.0]).reshape(1, 1, 5)
    n = Normalization.parse("abdomen").apply(ct)
    c, w = CT_PRESETS["abdomen"]
    assert np.allclose(n.ravel(), np.clip((ct.ravel() - (c - w / 2)) / w, 0, 1))
    custom = Normalization.parse("window:0,200").apply(ct)
    assert np.allclose(custom.ravel(), [0, 0, 0.75, 1, 1])
    assert Normalization.parse("auto").resolved(ct).window == CT_PRESETS["abdomen"]  # looks like CT
    with pytest.raises(InputError):
        Normalization.parse("window:40,-5")
    with pytest.raises(InputError):
        Normalization.parse("hounsfield")


def test_mr_percentiles_per_volume_and_per_slice():
    rng = np.random.default_rng(0)
    mr = np.stack([rng.uniform(0, 100, (8, 8)), rng.uniform(0, 10000, (8, 8))])
    whole = Normalization.parse("percentile:1,99").apply(mr)
    per = Normalization.parse("percentile:1,99", per_slice=True).apply(mr, axis=0)
    assert whole.dtype == np.float32 and whole.min() == 0 and whole.max() == 1
    assert whole[0].max() < 0.05  # volume-wide scaling keeps the dim slice dim
    assert per[0].max() == 1.0 and per[1].max() == 1.0
    assert Normalization.parse("auto").resolved(mr).mode == "percentile"


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_normalisation_a_few_slices_at_a_time_is_the_whole_volume_formula(monkeypatch, axis):
    from SAM2FewShotLib.io import normalization

    rng = np.random.default_rng(2)
    mr = rng.gamma(2.0, 50.0, (9, 10, 11)).astype(np.float32)
    lo, hi = np.percentile(mr, (1, 99))
    expected = np.moveaxis(np.clip((mr.astype(np.float64) - lo) / (hi - lo), 0, 1), axis, 0)
    monkeypatch.setattr(normalization, "CHUNK_VOXELS", 150)  # one or two slices per step
    got = Normalization.parse("percentile:1,99").slices(mr, axis)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == expected.shape
    assert np.allclose(got, expected, atol=1e-6)
    ct = rng.integers(-1024, 2000, (6, 7, 8)).astype(np.int16)
    window = Normalization.parse("window:40,400").slices(ct, axis)
    assert np.allclose(window, np.moveaxis(np.clip((ct - (40 - 200)) / 400.0, 0, 1), axis, 0), atol=1e-6)


def test_percentiles_of_a_large_volume_come_from_a_subsample(monkeypatch):
    from SAM2FewShotLib.io import normalization

    mr = np.random.default_rng(3).normal(100.0, 20.0, (40, 64, 64)).astype(np.float32)
    monkeypatch.setattr(normalization, "PERCENTILE_SAMPLES", 20000)  # stride 9 here
    lo, hi = normalization._percentiles(mr, (0.5, 99.5))
    exact = np.percentile(mr, (0.5, 99.5))
    assert abs(lo - exact[0]) < 2.0 and abs(hi - exact[1]) < 2.0  # within 0.1 standard deviation


def test_display_windowing_never_changes_voxels():
    img, _ = phantom()
    before = img.array.copy()
    FrameSource.from_volume(img, 0, 256, Normalization.parse("window:100,50"))
    assert np.array_equal(img.array, before)


def test_model_input_is_resized_three_channel_imagenet_normalised():
    x = torch.rand(3, 40, 48)
    m = model_input(x, 256)
    assert m.shape == (3, 3, 256, 256) and m.dtype == torch.float32
    assert torch.allclose(m[:, 0] * 0.229 + 0.485, m[:, 1] * 0.224 + 0.456, atol=1e-5)
    const = model_input(torch.full((1, 10, 10), 0.5), 64)
    assert torch.allclose(const[0, 2], torch.full((64, 64), (0.5 - 0.406) / 0.225), atol=1e-5)


def test_frame_source_batches_lazily_and_keeps_native_slices():
    img, _ = phantom()
    src = FrameSource.from_volume(img, 0, 256)
    assert len(src) == img.array.shape[0] and (src.height, src.width) == img.array.shape[1:]
    b = src.batch([0, 5])
    assert b.shape == (2, 3, 256, 256)
    assert src.slices01.float().min() >= 0 and src.slices01.float().max() <= 1
    with pytest.raises(InputError):
        FrameSource(np.zeros((4, 4)), 256)


@pytest.mark.parametrize("text, per_slice", [("abdomen", False), ("percentile", False), ("percentile", True)])
def test_frames_are_read_from_the_volume_exactly_as_the_normalised_stack(monkeypatch, text, per_slice):
    """No copy of the volume: indexing normalises only the slices asked for, to the same float32 values
    as the whole normalised stack, along any axis; the intensity features, widened a chunk at a time,
    equal one pass over the whole float32 stack."""
    from SAM2FewShotLib.sam2.frames import VolumeSlices
    from SAM2FewShotLib.support import features

    ct = np.random.default_rng(5).integers(-1024, 1500, (12, 40, 48)).astype(np.int16)
    volume = Volume(ct, (0.7, 0.7, 2.0), (0.0, 0.0, 0.0))
    norm = Normalization.parse(text, per_slice=per_slice)
    for axis in (0, 2):
        src = FrameSource.from_volume(volume, axis, 64, norm)
        exact = torch.from_numpy(norm.slices(ct, axis))
        assert isinstance(src.slices01, VolumeSlices) and src.nbytes == 0 and len(src) == exact.shape[0]
        assert torch.equal(src.slices01[3], exact[3]) and torch.equal(src.slices01[[5, 1]], exact[[5, 1]])
        assert torch.equal(src.slices01[2:6], exact[2:6]) and torch.equal(torch.stack(list(src.slices01)), exact)
        assert torch.equal(src.batch([3, 7]), model_input(exact[[3, 7]], 64))
    src = FrameSource.from_volume(volume, 0, 64, norm)
    whole = features.IntensityFeatures(8).embed(torch.from_numpy(norm.slices(ct, 0)))
    monkeypatch.setattr(features, "CHUNK_VOXELS", 40 * 48 * 5)  # 5 slices widened per step
    assert torch.allclose(features.IntensityFeatures(8).embed(src.slices01), whole, atol=1e-6)


def test_a_frame_is_always_encoded_in_the_same_group_and_kept_in_one_layout(random_predictor, monkeypatch):
    """One result per request, by construction: a frame's features do not depend on which frames were
    asked for first, nor on whether they were kept, offloaded or read back (issue 22: on an AMD EPYC the
    kernels differ in the last bits for other batch shapes and layouts, and a cohort's case differed
    from the same case run alone)."""
    from SAM2FewShotLib.sam2.feature_cache import FeatureCache
    from SAM2FewShotLib.sam2.frames import frames_per_batch

    assert frames_per_batch("cpu") == 1  # a CPU encodes a frame at a time: it buys no speed there
    assert frames_per_batch("cuda") == 4 and frames_per_batch(torch.device("mps")) == 4
    frames = FrameSource(torch.rand(7, 24, 20), random_predictor.image_size)
    calls = []
    batch = FrameSource.batch
    monkeypatch.setattr(FrameSource, "batch", lambda self, idx, device="cpu": calls.append(list(idx)) or batch(
        self, idx, device))

    def features(order, **kwargs):
        calls.clear()
        cache = FeatureCache(random_predictor, frames, random_predictor.device, batch_size=3, **kwargs)
        got = {i: cache.get(i) for i in order}
        return cache, {i: [f.clone() for f in got[i]["backbone_fpn"]] for i in got}, sorted(calls)

    cache, forward, groups = features(range(7))
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]  # fixed groups, the last one padded: one shape
    assert cache.encoded_frames == 7 and all(f.is_contiguous() for fpn in forward.values() for f in fpn)
    for order in ([6, 2, 5, 0, 3, 1, 4], [4, 3, 2, 1, 0, 6, 5]):
        _, other, other_groups = features(order)
        assert other_groups == groups
        assert all(torch.equal(a, b) for i in range(7) for a, b in zip(forward[i], other[i], strict=True))
    spilled, back, _ = features(range(7), max_bytes=1)  # all but a window read back from the scratch file
    assert len(spilled.spill) > 0
    again = [spilled.get(i)["backbone_fpn"] for i in range(7)]
    assert all(torch.equal(a, b) for i in range(7) for a, b in zip(forward[i], again[i], strict=True))
    assert all(f.stride() == g.stride() for i in range(7) for f, g in zip(forward[i], again[i], strict=True))
    embedded = FeatureCache(random_predictor, frames, random_predictor.device, batch_size=3)
    calls.clear()
    assert torch.equal(embedded.embed_all([5, 1]), cache.embed_all([5, 1])) and sorted(calls) == [[0, 1, 2], [3, 4, 5]]


def test_volume_rejects_wrong_dimensionality():
    with pytest.raises(InputError, match="3D"):
        Volume(np.zeros((4, 4)), (1, 1, 1), (0, 0, 0))
    with pytest.raises(InputError, match="3D"):
        Volume(np.zeros((2, 4, 4, 4)), (1, 1, 1), (0, 0, 0))
    assert np.allclose(rotation("z", 90) @ [1, 0, 0], [0, 1, 0])
