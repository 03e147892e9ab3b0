"""Guided prompts: pseudo-masks from registration or SAM2 become per-slice box / mask-hint prompts SAM2 refines."""

import json

import numpy as np
import pytest
import torch

from phantoms import TEST_CONFIG, phantom
from SAM2FewShotLib.cli.main import build_parser, main
from SAM2FewShotLib.cli.segment import request_from_args
from SAM2FewShotLib.common.context import RunContext
from SAM2FewShotLib.io.volume_io import (
    read_labels,
    read_volume,
    write_labels,
    write_volume,
)
from SAM2FewShotLib.methods import guided
from SAM2FewShotLib.methods.common import MethodInputs
from SAM2FewShotLib.methods.guided import (
    GuidedParams,
    box_from_mask,
    prompts_from_pseudo_masks,
    pseudo_masks,
    segment_guided,
)
from SAM2FewShotLib.methods.matched_support import FewShotParams
from SAM2FewShotLib.methods.registry import get_method
from SAM2FewShotLib.sam2.build import build_video_predictor
from SAM2FewShotLib.sam2.propagation import Prompt, propagate
from SAM2FewShotLib.sam2.session import VolumeSession

SMALL = 128  # the real sam2.1 tiny architecture at its smallest input size: these tests check plumbing


@pytest.fixture(scope="module")
def small_predictor():
    return build_video_predictor(TEST_CONFIG, image_size=SMALL, seed=0, device="cpu")


def check_prompts_follow_prior(report, prior_slices, segments, prior, margin, prompt_kinds, window=None):
    """A prompt (from ``prior``) exactly where a structure's pseudo-mask has voxels (within the window);
    propagation elsewhere."""
    kind = "+".join(prompt_kinds)
    lo, hi = window or (0, len(prior_slices) - 1)
    for seg in segments:
        present = {int(t) for t in np.flatnonzero((prior_slices == seg.value).any(axis=(1, 2))) if lo <= t <= hi}
        assert present, f"the prior has no {seg.name}: nothing to check"
        for t, entry in enumerate(report["slices"]):
            obj = entry["objects"][seg.name]
            assert obj["pseudo_voxels"] == int(np.count_nonzero(prior_slices[t] == seg.value))
            if t in present:
                assert obj["prior"] == prior and obj["source"] == f"{kind} prompt", (t, obj)
            else:
                assert obj["prior"] is None and "prompt" not in obj["source"], (t, obj)
    assert report["guided"]["prior"] == prior and report["guided"]["box_margin"] == margin


def test_box_from_mask_grows_by_margin_and_clips():
    mask = np.zeros((20, 16), bool)
    mask[3:7, 10:15] = True  # rows 3..6, columns 10..14
    assert box_from_mask(mask, 0) == (10, 3, 14, 6)
    assert box_from_mask(mask, 2) == (8, 1, 15, 8)  # x1 clipped to the last column
    assert box_from_mask(mask, 5) == (5, 0, 15, 11)
    assert box_from_mask(np.zeros((4, 4), bool), 3) is None


def test_prompts_only_on_slices_with_pseudo_mask():
    stack = np.zeros((5, 12, 10), np.uint8)
    stack[1, 2:5, 3:6] = 1
    stack[3, 6:9, 1:4] = 1
    stack[3, 0:2, 8:10] = 2
    kinds = {}
    for prompt_type in ("box", "mask", "box+mask"):
        prompts = prompts_from_pseudo_masks(stack, [1, 2], prompt_type, margin=1)
        assert [(p.frame, p.obj_id) for p in prompts] == [(1, 1), (3, 1), (3, 2)]
        for p in prompts:
            hit = stack[p.frame] == p.obj_id
            assert p.mask is None  # never a verbatim mask prompt
            assert (p.box == box_from_mask(hit, 1)) if "box" in prompt_type else p.box is None
            assert np.array_equal(p.mask_hint, hit) if "mask" in prompt_type else p.mask_hint is None
        kinds[prompt_type] = prompts[0].kind
    assert kinds == {"box": "box", "mask": "mask-hint", "box+mask": "box+mask-hint"}
    only = prompts_from_pseudo_masks(stack, [1, 2], "box", margin=1, frame_range=(2, 4))
    assert [(p.frame, p.obj_id) for p in only] == [(3, 1), (3, 2)]


def test_mask_hint_is_refined_not_returned(small_predictor):
    """The hint changes SAM2's output against the box alone, and the output is not the hint."""
    image, labels = phantom(shape_kji=(3, 40, 48), seed=3)
    session = VolumeSession(small_predictor, image)
    truth = session.slices_of(labels.volume.array)[1] == 1
    box = box_from_mask(truth, 3)
    shifted = np.roll(truth, 4, axis=1)

    def first_slice_logits(**prompt):
        state = small_predictor.init_volume_state(session.frames, cache=session.cache)
        _, _, logits = small_predictor.add_box_with_mask_hint(state, 1, 1, **prompt)
        return logits[0, 0].float()

    box_only = first_slice_logits(box=box)
    hinted = first_slice_logits(box=box, mask_hint=truth)
    other_hint = first_slice_logits(box=box, mask_hint=shifted)
    hint_alone = first_slice_logits(mask_hint=truth)
    assert (hinted - box_only).abs().max() > 1e-3
    assert (hinted - other_hint).abs().max() > 1e-3
    for out in (hinted, hint_alone):
        assert not np.array_equal(out.numpy() > 0, truth)
    # through propagate: reported as a hint, and the hint is not pasted into the result
    result = propagate(small_predictor, session.frames, [Prompt(1, 1, box=box, mask_hint=truth)], cache=session.cache)
    assert result.sources[1][1] == "box+mask-hint prompt"
    assert not np.array_equal(result.labels[1] == 1, truth)
    assert np.array_equal(result.labels[1] == 1, result.prompt_model_masks[1][0])


def test_registration_prior_on_hippocampus(shared_data, small_predictor):
    folder = shared_data / "msd_hippocampus"
    query_path, support = folder / "hippocampus_015_img.nii.gz", (folder / "hippocampus_184_img.nii.gz",
                                                                    folder / "hippocampus_184_label.nii.gz")
    query = read_volume(query_path)
    supports = [(read_volume(support[0]), read_labels(support[1]))]
    session = VolumeSession(small_predictor, query)
    prior, _ = pseudo_masks(session, supports, GuidedParams())
    prior_slices = session.slices_of(prior.volume.array)
    # a window over where the prior's structures start (slices with and without a pseudo-mask), for speed
    first = int(np.flatnonzero((prior_slices > 0).any(axis=(1, 2)))[0])
    lo, hi = max(0, first - 3), min(len(prior_slices) - 1, first + 5)
    empty = ~(prior_slices[lo:hi + 1] > 0).any(axis=(1, 2))
    assert empty.any() and not empty.all()

    args = build_parser().parse_args(["segment", "--query", str(query_path), "--out", "unused.nii.gz",
                                      "--support", *map(str, support), "--method", "guided", "--box-margin", "3",
                                      "--slice-range", str(lo), str(hi)])
    request = request_from_args(args)  # the options become the guided method's parameters
    params = get_method("guided").params(request.params, seed=request.model.seed)
    assert params.box_margin == 3 and params.lora.steps == 0 and params.prior == "registration"
    weights = {k: v.clone() for k, v in small_predictor.state_dict().items()}
    labels, report = guided.run(MethodInputs(query, session, supports,
                                             context=RunContext(frame_range=request.frames.slice_range)), params)
    check_prompts_follow_prior(report, prior_slices, supports[0][1].segments, "registration", 3,
                               ["box", "mask-hint"], window=(lo, hi))
    assert all(report["slices"][t]["objects"]["label_1"]["source"] == "not visited"
               for t in range(len(prior_slices)) if not lo <= t <= hi)
    assert report["timing"]["slices_run"] == hi - lo + 1  # the time per slice is per slice of the range
    assert labels.volume.same_grid(query)
    assert [s.name for s in labels.segments] == ["label_1", "label_2"]
    assert report["method"] == "guided" and report["lora"] is None
    assert report["guided"]["prior_report"]["method"] == "registration"
    # LoRA off: the session's own model, weights untouched
    assert all(torch.equal(weights[k], v) for k, v in small_predictor.state_dict().items())


def test_sam2_prior_on_phantoms(small_predictor):
    query, _ = phantom(shape_kji=(8, 32, 40), seed=1)
    support = phantom(shape_kji=(8, 32, 40), seed=0)
    session = VolumeSession(small_predictor, query)
    params = GuidedParams(prior="sam2", prompt_type="box", box_margin=2,
                          fewshot=FewShotParams(scheme="pair", augmentations=1, slices_per_structure=2))
    prior, _ = pseudo_masks(session, [support], params)
    labels, report = segment_guided(session, [support], params)
    check_prompts_follow_prior(report, session.slices_of(prior.volume.array),
                               [s for s in support[1].segments if s.name in {x.name for x in labels.segments}],
                               "sam2", 2, ["box"])
    assert labels.volume.same_grid(query)
    assert {s.name for s in labels.segments} <= {"structure_1", "structure_2"} and labels.segments
    assert report["guided"]["prior_report"]["fewshot"]["scheme"] == "pair"


def test_cli_registration_needs_no_model(tmp_path, monkeypatch, capsys, shared_data):
    monkeypatch.setenv("SAM2FEWSHOT_CACHE", str(tmp_path / "empty_cache"))  # no weights anywhere, offline
    folder = shared_data / "msd_hippocampus"
    supports = []
    for case in ("184", "195"):
        supports += ["--support", *(folder / f"hippocampus_{case}_{kind}.nii.gz" for kind in ("img", "label"))]
    out = tmp_path / "reg.seg.nrrd"
    code = main([str(a) for a in ["segment", "--query", folder / "hippocampus_015_img.nii.gz", *supports,
                                  "--method", "registration", "--offline", "--out", out, "-q"]])
    assert code == 0, capsys.readouterr().err
    query = read_volume(folder / "hippocampus_015_img.nii.gz")
    labels = read_labels(out, reference=query)
    truth = read_labels(folder / "hippocampus_015_label.nii.gz").volume.array
    assert labels.volume.same_grid(query) and [s.name for s in labels.segments] == ["label_1", "label_2"]
    for value in (1, 2):  # a real registration, not an empty map
        a, b = labels.volume.array == value, truth == value
        assert 2 * np.count_nonzero(a & b) / (a.sum() + b.sum()) > 0.4
    report = json.loads((tmp_path / "reg_report.json").read_text())
    assert report["method"] == "registration" and report["model"]["weights"] is None
    assert report["fusion"] == "weighted" and len(report["supports"]) == 2
    assert not (tmp_path / "empty_cache").exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "guided", "--prompt-labels", "L"], "--method guided needs --support"),
    (["--support", "S", "L", "--lora-steps", "3"],
     "--lora-steps does not apply to the matched-support method (it is for guided)"),
    (["--support", "S", "L", "--method", "guided", "--box-margin", "-1"], "box margin"),
])
def test_cli_guided_bad_options_fail_before_any_work(tmp_path, capsys, extra, message):
    image, labels = phantom(shape_kji=(4, 16, 16))
    write_volume(image, tmp_path / "q.nii.gz")
    write_labels(labels, tmp_path / "l.nii.gz")
    extra = [str(tmp_path / "q.nii.gz") if a == "S" else str(tmp_path / "l.nii.gz") if a == "L" else a for a in extra]
    code = main(["segment", "--query", str(tmp_path / "q.nii.gz"), "--out", str(tmp_path / "o.nii.gz"),
                 "--random-weights", "--image-size", str(SMALL), "-q", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.nii.gz").exists()
