"""The benchmark: surface metrics with known answers, peak memory, the peer pipeline, and the
`sam2fewshot bench` command end to end on two real hippocampus cases with the real architecture."""

import json
import math
import os

import numpy as np
import pytest
import torch

from SAM2FewShotLib.bench.leave_one_out import (
    BenchSettings,
    bench_cases,
    choose_methods,
    plan_queries,
    truth_prompt_labels,
)
from SAM2FewShotLib.bench.metrics import (
    hd95,
    score_labels,
    score_masks,
    summarize,
    surface_dice,
    surface_distances,
    surface_voxels,
)
from SAM2FewShotLib.bench.ram import (
    MB,
    ModelRecipe,
    PeakMemory,
    fit_per_slice,
    scaling_point,
)
from SAM2FewShotLib.bench.synthetic import (
    SYNTHETIC_SPACING,
    slice_masks,
    synthetic_case,
)
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap, Segment, Volume

TEST_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


@pytest.fixture
def one_thread():
    """Small ops on 2 shared cores run several times faster on one torch thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


# ---------------------------------------------------------------- metrics with known answers


def test_surface_voxels_face_connectivity_and_border():
    cube = _box((5, 5, 5), (1, 1, 1), (4, 4, 4))
    assert surface_voxels(cube).sum() == 26  # a 3x3x3 cube: all but its centre
    assert surface_voxels(_box((5, 5, 5), (2, 2, 2), (3, 3, 3))).sum() == 1
    full = np.ones((3, 4, 5), bool)  # the image border is outside
    assert surface_voxels(full).sum() == full.size - 1 * 2 * 3


def test_identical_masks_agree_perfectly():
    m = _box((12, 12, 12), (2, 3, 4), (9, 8, 10))
    s = score_masks(m, m, (0.7, 1.3, 2.5), tolerance_mm=0.0)
    assert (s.dice, s.hd95_mm, s.nsd) == (1.0, 0.0, 1.0)


def test_single_voxels_apart_by_known_millimetres():
    spacing = (0.5, 1.0, 2.0)  # (i, j, k) mm
    a = _box((6, 6, 6), (1, 2, 2), (2, 3, 3))
    b = _box((6, 6, 6), (4, 2, 2), (5, 3, 3))  # 3 voxels along k: 6 mm
    assert hd95(a, b, spacing) == pytest.approx(6.0)
    assert surface_dice(a, b, spacing, tolerance_mm=5.9) == 0.0
    assert surface_dice(a, b, spacing, tolerance_mm=6.0) == 1.0
    c = _box((6, 6, 6), (1, 2, 5), (2, 3, 6))  # 3 voxels along i instead: 1.5 mm
    assert hd95(a, c, spacing) == pytest.approx(1.5)


def test_parallel_plates_every_surface_point_at_the_offset():
    spacing = (1.0, 1.0, 2.0)
    a = _box((10, 12, 12), (2, 0, 0), (3, 12, 12))
    b = _box((10, 12, 12), (5, 0, 0), (6, 12, 12))  # 3 slices of 2 mm apart
    d_ab, d_ba = surface_distances(a, b, spacing)
    assert np.allclose(d_ab, 6.0) and np.allclose(d_ba, 6.0)
    s = score_masks(a, b, spacing, tolerance_mm=1.0)
    assert (s.dice, s.hd95_mm, s.nsd) == (0.0, pytest.approx(6.0), 0.0)
    assert score_masks(a, b, spacing, tolerance_mm=6.0).nsd == 1.0


def test_offset_cubes_against_a_brute_force_reference():
    spacing = (1.5, 1.0, 1.0)  # i is 1.5 mm
    a = _box((14, 14, 16), (2, 2, 2), (12, 12, 12))
    b = _box((14, 14, 16), (2, 2, 4), (12, 12, 14))  # shifted 2 voxels along i: 3 mm
    s = score_masks(a, b, spacing, tolerance_mm=1.5)
    assert s.dice == pytest.approx(2 * 800 / 2000)  # 10x10x8 overlap of two 10^3 cubes

    def points(m):  # surface voxel centres in mm, (i, j, k)
        k, j, i = np.nonzero(surface_voxels(m))
        return np.stack([i * spacing[0], j * spacing[1], k * spacing[2]], axis=1)

    pa, pb = points(a), points(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    expected_hd = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    expected_nsd = ((d_ab <= 1.5).sum() + (d_ba <= 1.5).sum()) / (d_ab.size + d_ba.size)
    assert s.hd95_mm == pytest.approx(expected_hd)
    assert 0.0 < s.hd95_mm <= 3.0 and d.min(axis=1).max() == pytest.approx(3.0)
    assert s.nsd == pytest.approx(expected_nsd) and 0.0 < s.nsd < 1.0


def test_empty_masks_by_convention():
    empty, some = np.zeros((4, 4, 4), bool), _box((4, 4, 4), (1, 1, 1), (3, 3, 3))
    both = score_masks(empty, empty, (1, 1, 1))
    assert (both.dice, both.hd95_mm, both.nsd, both.empty) == (1.0, 0.0, 1.0, "both")
    missed = score_masks(empty, some, (1, 1, 1))
    assert (missed.dice, missed.hd95_mm, missed.nsd, missed.empty) == (0.0, math.inf, 0.0, "result")
    assert missed.as_json()["hd95_mm"] is None and missed.as_json()["empty"] == "result"
    assert score_masks(some, empty, (1, 1, 1)).empty == "truth"
    stats = summarize([1.0, 3.0, math.inf, None, math.nan])
    assert (stats.mean, stats.sd, stats.n, stats.n_inf) == (2.0, pytest.approx(math.sqrt(2)), 2, 1)
    assert summarize([math.inf]).mean is None


def test_structures_are_matched_by_name_then_value():
    grid = dict(spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0))
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[1:4, 2:6, 2:6] = 1
    truth[4:6, 1:3, 1:3] = 2
    result = np.where(truth == 1, 7, 0).astype(np.uint8)  # structure "a" under another value
    scores = score_labels(LabelMap(Volume(result, **grid), (Segment(7, "a"),)),
                          LabelMap(Volume(truth, **grid), (Segment(1, "a"), Segment(2, "b"))))
    assert scores["a"].dice == 1.0 and scores["b"].dice == 0.0 and scores["b"].empty == "result"
    with pytest.raises(InputError, match="different grids"):
        score_labels(LabelMap(Volume(result[:5], **grid)), LabelMap(Volume(truth, **grid)))


# ---------------------------------------------------------------- memory, synthetic volumes, planning


def test_peak_memory_catches_a_freed_allocation():
    with PeakMemory() as mem:
        block = np.ones(160 * 1024 * 1024 // 8)  # 160 MB, touched, then freed inside the block
        del block
    assert mem.above_start_bytes >= 150 * MB
    assert mem.as_json()["peak_gpu_mb"] is None and mem.method in ("VmHWM", "sampled")
    with PeakMemory() as small:
        pass
    assert small.above_start_bytes < 50 * MB  # the mark was reset: the earlier peak is not seen
    assert fit_per_slice([{"slices": 10, "x": 3.0}, {"slices": 30, "x": 7.0}], "x") == pytest.approx(0.2)


def test_synthetic_case_has_every_structure_on_every_slice():
    image, labels = synthetic_case(7, size=48, n_structures=3, seed=1)
    assert image.array.shape == labels.volume.array.shape == (7, 48, 48)
    assert image.spacing == SYNTHETIC_SPACING and image.array.dtype == np.float32
    assert [s.value for s in labels.segments] == [1, 2, 3]
    for k in range(7):
        assert sorted(slice_masks(labels, k)) == [1, 2, 3]
    assert np.array_equal(synthetic_case(7, 48, 3, seed=1)[0].array, image.array)  # seeded


def test_plans_and_cases(shared_data, tmp_path):
    ts = shared_data / "totalsegmentator_examples"
    for name in ("example_ct_sm.nii.gz", "example_ct_sm_seg.nii.gz", "example_mr_sm.nii.gz"):
        (tmp_path / name).symlink_to(ts / name)
    assert list(bench_cases(tmp_path)) == ["example_ct_sm"]  # the MR image has no _seg beside it here
    cases = bench_cases(shared_data / "msd_hippocampus")
    assert len(cases) == 5 and all(img.name.endswith("_img.nii.gz") for img, _ in cases.values())
    names = list(cases)
    plan = plan_queries(cases, BenchSettings(max_cases=3, max_supports=1))
    assert plan == [(names[0], [names[1]]), (names[1], [names[0]]), (names[2], [names[0]])]
    fixed = plan_queries(cases, BenchSettings(support=names[4]))
    assert [q for q, _ in fixed] == names[:4] and all(s == [names[4]] for _, s in fixed)
    with pytest.raises(InputError, match="at least two"):
        plan_queries(cases, BenchSettings(max_cases=1))
    with pytest.raises(InputError, match="unknown method"):
        choose_methods(["propagate", "nonsense"])


def test_truth_prompts_use_each_structures_largest_slice():
    image, labels = synthetic_case(5, size=32, n_structures=2)
    arr = labels.volume.array.copy()
    arr[3][arr[3] == 0] = 2  # structure 2 is largest on slice 3
    labels = labels.with_array(arr)
    prompt = truth_prompt_labels(labels, axis=0)
    best_1 = int(np.argmax((arr == 1).sum(axis=(1, 2))))
    assert prompt.volume.same_grid(image) and prompt.segments == labels.segments
    assert [sorted(int(v) for v in np.unique(prompt.volume.array[t]) if v) for t in range(5)] == \
        [[1] * (t == best_1) + [2] * (t == 3) for t in range(5)]
    assert np.array_equal(prompt.volume.array[3] == 2, arr[3] == 2)
    assert np.array_equal(prompt.volume.array[best_1] == 1, arr[best_1] == 1)
    along_j = truth_prompt_labels(labels, axis=1)  # the largest slice along another axis
    assert (along_j.volume.array > 0).any(axis=(0, 2)).sum() <= 2


def test_scaling_point_accounts_for_frames_and_features(one_thread):
    point = scaling_point(ModelRecipe(TEST_CONFIG, None, 128, 0, "cpu", 1), 12, 32, 1, 0.001)
    assert point["slices"] == 12 and point["frames_mb"] == 0  # frames are read from the volume, not copied
    # a tiny budget keeps two encoder batches in memory (of one frame each on a CPU); the other 10 frames went
    # to disk
    assert point["features_on_disk_mb"] == 5 * point["features_held_mb"] > 0
    assert point["outputs_mb"] == round(12 * 32 * 32 / MB, 1) and point["peak_rss_above_start_mb"] > 0
    assert point["rss_method"] in ("VmHWM", "sampled")
    assert 0 < point["live_at_end_mb"] <= point["peak_rss_above_start_mb"]


# ---------------------------------------------------------------- the peer-style pipeline


def test_peer_pipeline_does_the_same_model_work(random_predictor, one_thread):
    from SAM2FewShotLib.bench.peer import peer_speed

    r = peer_speed(random_predictor, TEST_CONFIG, n_slices=3, size=48, n_structures=2)
    ours, ref = r["ours"], r["reference"]
    for side in (ours, ref):
        assert 0 < side["model_s"] <= side["wall_s"] and 0 <= side["outside_model_share"] < 1
    # same frames, same objects, same prompts: the same memory-attention and decoder calls
    for part in ("memory_attention", "sam_mask_decoder", "memory_encoder"):
        assert ours["model_calls"][part] == ref["model_calls"][part] > 0, part
    assert ref["model_calls"]["image_encoder"] == 3  # one frame at a time
    assert ours["model_calls"]["image_encoder"] == 3  # on a CPU ours too (sam2/frames.frames_per_batch)
    assert r["ratio_reference_over_ours"] == pytest.approx(ref["wall_s"] / ours["wall_s"], rel=0.01)
    assert set(r["agreement_dice"]) == {"tube_1", "tube_2"}


# ---------------------------------------------------------------- the command end to end


def _two_cases(shared_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for case in ("015", "184"):
        for kind in ("img", "label"):
            name = f"hippocampus_{case}_{kind}.nii.gz"
            (data / name).symlink_to(shared_data / "msd_hippocampus" / name)
    return data


def test_bench_command_end_to_end(shared_data, tmp_path, capsys):
    data, out = _two_cases(shared_data, tmp_path), tmp_path / "report"
    threads = torch.get_num_threads()
    code = main(["bench", "--data", str(data), "--out", str(out), "--random-weights", "--image-size", "128",
                 "--support", "hippocampus_184", "--max-cases", "1", "--augmentations", "1", "--slices-per-structure",
                 "2", "--threads", "1",
                 "--peer-speed", "3", "--synthetic-structures", "2", "--memory-scaling", "4,8",
                 "--synthetic-size", "48", "--memory-mmap-threshold", "65536", "-q"])
    assert code == 0, capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    methods = [m.name for m in choose_methods()]
    assert list(results["methods"]) == methods and "propagate" in methods
    assert results["cases"] == ["hippocampus_015"]  # segmented from hippocampus_184 (one case keeps CI short)
    assert [(r["case"], r["method"]) for r in results["runs"]] == [(c, m) for c in results["cases"] for m in methods]
    for r in results["runs"]:
        assert r["status"] == "ok", r
        assert set(r["structures"]) == {"label_1", "label_2"}
        for s in r["structures"].values():
            assert 0.0 <= s["dice"] <= 1.0 and 0.0 <= s["nsd"] <= 1.0 and s["truth_voxels"] > 0
        assert r["per_slice_s"] > 0 and r["memory"]["peak_rss_mb"] > 0
        assert r["uses_query_truth"] == (r["method"] == "propagate")
        if r["method"].startswith("matched-support"):  # the query is warm; each scheme encodes its own supports
            assert r["frames_encoded"] > 0
    assert set(results["summary"]) == set(methods)
    assert results["peer_speed"]["ratio_reference_over_ours"] > 0
    assert [(p["slices"], p["mmap_threshold"]) for p in results["memory_scaling"]["points"]] == [(4, 65536),
                                                                                              (8, 65536)]
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # set for the measuring processes only
    md = (out / "results.md").read_text()
    for m in methods:
        assert f"| {m} |" in md or f"| {m} * |" in md
    assert "peer-style pipeline" in md and "slice count" in md
    for png in ("dice.png", "time_per_slice.png", "memory_scaling.png", "peer_speed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert torch.get_num_threads() == threads  # --threads applied to the run only


def test_bench_command_refuses_bad_input_without_writing(shared_data, tmp_path, capsys):
    data, out = _two_cases(shared_data, tmp_path), tmp_path / "report"
    assert main(["bench", "--out", str(out)]) == 2
    assert "nothing to benchmark" in capsys.readouterr().err
    assert main(["bench", "--data", str(data), "--out", str(out), "--methods", "propagate,nope",
                 "--random-weights"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert not out.exists()  # nothing is created before the input is known to be good
    (tmp_path / "file").write_text("x")
    assert main(["bench", "--data", str(data), "--out", str(tmp_path / "file"), "--random-weights"]) == 2
    assert main(["bench", "--data", str(data), "--out", str(out), "--memory-scaling", "1,x"]) == 2


# ---------------------------------------------------------------- the profile (issue 16)


def test_profile_parts_add_up_and_count_the_encoders_flops(small_predictor, tmp_path, capsys):
    from SAM2FewShotLib.bench.profile import KINDS, PARTS, PYTHON, REST, flop_counter

    out = tmp_path / "profile.json"
    assert main(["bench", "--profile", "--random-weights", "--image-size", "128", "--synthetic-size", "48",
                 "--synthetic-structures", "2", "--profile-slices", "4", "--augmentations", "1",
                 "--slices-per-structure", "2", "--threads", "1", "--json", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    profile = json.loads(out.read_text())["profile"]
    assert profile["matmul_peak_gflops"] > 0 and profile["model"]["precision"] == "fp32"
    with torch.inference_mode(), flop_counter() as bare:  # one frame through the bare encoder
        small_predictor.image_encoder(torch.zeros(1, 3, 128, 128))
    per_frame = bare.get_total_flops()
    assert set(profile["runs"]) == {"propagate", "matched-support"}
    for method, run in profile["runs"].items():
        parts = run["parts"]
        assert list(parts) == list(PARTS) + [REST] and run["slices"] == 4, method
        # the table's rows make up the measured wall time, and the profiler's own events most of it
        assert sum(p["time_s"] for p in parts.values()) == pytest.approx(run["total_s"], rel=1e-6)
        unaccounted = parts[REST]["kinds"][PYTHON]["time_s"]  # what no profiler event covers
        assert 0 <= unaccounted < 0.3 * run["total_s"], (method, unaccounted, run["total_s"])
        for name in PARTS:  # the ops inside a part never exceed its span (nothing counted twice)
            assert parts[name]["time_s"] > 0 and parts[name]["kinds"][PYTHON]["time_s"] > -1e-3, (method, name)
            assert set(parts[name]["kinds"]) == set(KINDS)
        encoder = parts["image encoder"]
        assert encoder["flops"] > 0 and encoder["kinds"]["attention"]["flops"] > 0
        assert encoder["flops"] == run["frames_encoded"] * per_frame, method
        assert parts["memory attention"]["flops"] > 0 and parts["mask decoder"]["flops"] > 0
        assert run["flops"] == sum(p["flops"] for p in parts.values())
    assert "| image encoder |" in printed and "matmul peak" in printed
