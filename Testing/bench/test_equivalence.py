"""Proof by equivalence: every SAM2 path of ours gives the logits stock sam2 gives for the same
conditioning (bench/equivalence.py), within 1e-4 in float32 on the CPU; where we differ by design,
the difference is shown.

Real sam2.1 tiny architecture with seeded random weights, real files, stock SAM2VideoPredictor.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from phantoms import phantom, write_query_and_support
from SAM2FewShotLib.bench.equivalence import (
    TOLERANCE,
    add_stock_prompts,
    checked_against_stock,
    compare,
    replay,
    stock_state,
    stock_track,
    stock_twin,
)
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.io.volume_io import write_labels, write_volume
from SAM2FewShotLib.library.cases import write_list_file
from SAM2FewShotLib.methods.presets import PRESETS
from SAM2FewShotLib.run.request import Request
from SAM2FewShotLib.run.runner import Runner
from SAM2FewShotLib.sam2.build import ModelOptions
from SAM2FewShotLib.sam2.frames import FrameSource
from SAM2FewShotLib.sam2.propagation import Prompt, propagate, watched

MODEL = ModelOptions(random_weights=True, image_size=128, device="cpu")


def _volume(n: int = 12, h: int = 40, w: int = 48) -> tuple[FrameSource, np.ndarray, np.ndarray]:
    """Two structures drifting through the slices, with noise: (frames, disc of slice 2, yy/xx grids)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    vol = np.zeros((n, h, w), np.float32)
    for t in range(n):
        vol[t] = 0.2 + 0.6 * (((yy - 15) ** 2 + (xx - 14 - t // 2) ** 2) < (6 + t / 3) ** 2)
        vol[t] += 0.3 * (((yy - 28) ** 2 + (xx - 34) ** 2) < 30)
    vol = np.clip(vol + rng.normal(0, 0.03, vol.shape), 0, 1).astype(np.float32)
    return FrameSource(vol, 128), ((yy - 15) ** 2 + (xx - 15) ** 2) < 49, (yy, xx)


PROMPTS = [
    lambda disc: Prompt(2, 1, mask=disc),
    lambda disc: Prompt(9, 1, box=[10, 6, 30, 26]),
    lambda disc: Prompt(4, 2, points=np.array([[34.0, 28.0], [5.0, 5.0]]), point_labels=np.array([1, 0])),
    lambda disc: Prompt(10, 2, box=[27, 21, 41, 35], points=np.array([[34.0, 28.0]]), point_labels=np.array([1])),
]


@pytest.fixture(scope="module")
def recorded(small_predictor):
    """One propagation with masks, boxes and points on several slices, for two objects, as recorded."""
    frames, disc, _ = _volume()
    prompts = [make(disc) for make in PROMPTS]
    calls = []
    with watched(calls.append):
        result = propagate(small_predictor, frames, prompts)
    return calls[0], result, disc


def test_propagation_equals_stock_forward_then_reverse_merged_by_the_nearer_prompt(recorded):
    call, result, disc = recorded
    comparison = replay(call)
    assert comparison.kind == "prompts:box+box+points+mask+points"
    assert (comparison.slices, comparison.objects) == (12, 2)
    assert comparison.max_abs_diff <= TOLERANCE, comparison.as_json()
    assert comparison.equal and comparison.dice > 0.999
    # By design, a mask-prompted slice returns the user's mask itself, not the model's reading of it.
    assert np.array_equal(result.labels[2] == 1, disc)
    assert "mask-prompted" in comparison.notes[0]


def test_each_pass_starts_from_the_prompts_alone_where_stock_reverse_would_reuse_the_forward_memory(recorded):
    """Stock reverse run on the state the forward pass left sees that pass's predictions as memory;
    ours (and our stock replay) starts the backward pass afresh: shown here to matter."""
    call, _, _ = recorded
    twin = stock_twin(call.predictor)
    slices = list(call.frames.slices01)
    with torch.inference_mode():
        state = stock_state(twin, slices, call.frames.height, call.frames.width)
        add_stock_prompts(twin, state, call.prompts)
        stock_track(twin, state, 2, 10, False, call.obj_ids)
        reused = stock_track(twin, state, 10, 11, True, call.obj_ids)
        state = stock_state(twin, slices, call.frames.height, call.frames.width)
        add_stock_prompts(twin, state, call.prompts)
        fresh = stock_track(twin, state, 10, 11, True, call.obj_ids)
    differs = [t for t in fresh if float((fresh[t] - reused[t]).abs().max()) > TOLERANCE]
    assert differs
    # Our backward pass is the fresh one: on a slice nearer the later prompt, ours is stock's fresh reverse.
    assert float((call.logits[8][0] - fresh[8][0]).abs().max()) <= TOLERANCE


def test_the_comparison_catches_a_conditioning_that_differs(recorded):
    call, _, _ = recorded
    dropped = dataclasses.replace(call, prompts=[p for p in call.prompts if p.frame != 9])
    comparison = replay(dropped)
    assert not comparison.equal and comparison.max_abs_diff > 100 * TOLERANCE
    assert comparison.worst_slice is not None
    with pytest.raises(AssertionError, match="slices differ"):
        compare(call.logits, {t: v for t, v in call.logits.items() if t}, call.obj_ids, "test")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    write_query_and_support(root, "query.nrrd", "support.nrrd", "support.seg.nrrd")
    case = (str(root / "support.nrrd"), str(root / "support.seg.nrrd"))
    (root / "library").mkdir()
    return {"query": str(root / "query.nrrd"), "supports": (case,),
            "library": str(write_list_file([case], root / "library"))}


def _run_checked(files, method: str, params: dict) -> list:
    inputs = {"library": files["library"]} if method == "retrieval" else {"supports": files["supports"]}
    runner = Runner(save_support_features=False)
    try:
        with checked_against_stock() as found:
            runner.run(Request(method=method, query=files["query"], model=MODEL, params=params, **inputs))
    finally:
        runner.close()
    return found


@pytest.mark.parametrize("method, params, kinds", [
    ("matched-support", {"scheme": "pair", "augmentations": 2}, ["supports:pair"]),
    ("matched-support", {"scheme": "video", "augmentations": 2}, ["supports:video"]),
    ("matched-support", {"scheme": "video+memory", "augmentations": 2}, ["supports:video+memory"]),
    ("retrieval", {}, ["supports:video+memory"]),
    ("guided", {"prior": "registration"}, ["prompts:box+mask-hint"]),
    ("guided", {"prior": "sam2", "prompt_type": "box"}, ["supports:video", "prompts:box"]),
])
def test_every_method_conditions_sam2_as_its_stock_construction(files, method, params, kinds):
    """pair: a stock 2-frame video [support, slice] per slice and structure; video: [e_k-1 .. e_0,
    slice]; video+memory: the query as one stock video whose conditioning frames are swapped for each
    slice's own supports between steps of propagate_in_video (module docstring of equivalence.py)."""
    found = _run_checked(files, method, params)
    assert [c.kind for c in found] == kinds
    for c in found:
        assert c.slices == 8 and c.max_abs_diff <= TOLERANCE, c.as_json()


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_conditions_sam2_as_the_paper_builds_its_video(files, name):
    """fs-medsam2: one stock video [support, query slices], mask on the support, forward only;
    fate-sam: the query then 3 slot frames that take each slice's own supports (add_new_mask) before
    sam2 computes it, backward from the middle then forward with the memory carried."""
    preset = PRESETS[name]
    found = _run_checked(files, preset.method, preset.params)
    assert len(found) == 1 and found[0].equal, found[0].as_json()
    expected = {"fs-medsam2": "(before-query, forward)", "fate-sam": "(after-query, middle-out)"}
    assert found[0].kind.endswith(expected.get(name, "supports:video+memory"))


def test_bench_check_equivalence_prints_every_method_and_fails_on_none(files, tmp_path, capsys):
    data = tmp_path / "cases"
    data.mkdir()
    for n, seed in ((1, 0), (2, 1)):
        image, labels = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0), seed=seed)
        write_volume(image, data / f"case{n}.nii.gz")
        write_labels(labels, data / f"case{n}_seg.nii.gz")
    code = main(["bench", "--check-equivalence", "--data", str(data), "--support", "case2", "--out",
                 str(tmp_path / "out"), "--random-weights", "--image-size", "128", "--quiet",
                 "--methods", "propagate,matched-support:pair,registration", "--preset", "fs-medsam2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "## Equivalence with stock sam2" in out
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["equivalence"]
    assert [r["method"] for r in rows] == ["propagate", "matched-support:pair", "preset:fs-medsam2"]
    assert all(r["equal"] and r["max_abs_logit_diff"] <= TOLERANCE for r in rows)
    for r in rows:
        assert f"| case1 | {r['method']} |" in out


def test_a_preset_sets_method_and_parameters_and_options_given_change_them(files):
    from SAM2FewShotLib.cli.main import build_parser
    from SAM2FewShotLib.cli.segment import request_from_args
    from SAM2FewShotLib.common.errors import InputError

    base = ["segment", "--query", files["query"], "--out", "x.nii.gz"]
    support = ["--support", *files["supports"][0]]
    request = request_from_args(build_parser().parse_args(base + support + ["--preset", "fs-medsam2", "--top-k", "2"]))
    assert request.method == "matched-support"
    assert {k: request.params[k] for k in ("selection", "placement", "passes", "augmentations", "top_k")} == {
        "selection": "middle", "placement": "before-query", "passes": "forward", "augmentations": 1, "top_k": 2}
    library = ["--library", files["library"]]
    request = request_from_args(build_parser().parse_args(base + library + ["--preset", "fate-sam"]))
    assert request.method == "retrieval" and request.params["passes"] == "middle-out"
    for extra, message in ((support + ["--preset", "fate-sam"], "needs --library"),
                           (support + ["--preset", "fs-medsam2", "--method", "guided"], "leave --method out")):
        with pytest.raises(InputError, match=message):
            request_from_args(build_parser().parse_args(base + extra))


def test_the_middle_support_slice_is_halfway_through_the_labelled_slices():
    from SAM2FewShotLib.io.volume import LabelMap, Segment
    from SAM2FewShotLib.support.slices import select_support_slices

    image, labels = phantom((10, 16, 16))
    lab = np.zeros_like(labels.volume.array)
    lab[3:8, 4:10, 4:10] = 1  # slices 3..7 along axis 0: FS-MedSAM2's zlist[int(0.5 * 5)] = 5
    labelmap = LabelMap(labels.volume.with_array(lab), (Segment(1, "a", (1.0, 0.0, 0.0)),))
    picked = select_support_slices(np.zeros(lab.shape, np.float32), labelmap, 0, 8, rule="middle")
    assert [s.index for s in picked] == [5]
