"""Each default in one place: a method's Params. The CLI (segment, batch, bench, demo, library), the Slicer
panel's choices and parameter node, and the bench read it from there; an option is declared once, in the
method (or the shared base), and every front end builds from that declaration."""

from __future__ import annotations

import ast
import dataclasses
import xml.etree.ElementTree as ET

import pytest

from phantoms import REPO
from SAM2FewShotLib.cli.main import build_parser
from SAM2FewShotLib.cli.method_options import declarations
from SAM2FewShotLib.cli.segment import request_from_args
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.methods.matched_support import FewShotParams
from SAM2FewShotLib.methods.options import MemoryParams
from SAM2FewShotLib.methods.registry import METHODS, get_method
from SAM2FewShotLib.run.request import FrameOptions
from SAM2FewShotLib.sam2.build import ModelOptions
from SAM2FewShotLib.slicer import panel

MODULE = REPO / "SAM2FewShot"
BASE = ["segment", "--query", "q.nii.gz", "--out", "o.nii.gz"]


def _parse(*argv):
    return build_parser().parse_args([*BASE, *argv])


def test_every_option_is_declared_once_and_shows_its_methods_default():
    help_text = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["segment"]._actions}
    for dest, users in declarations().items():
        method, first = users[0]
        default = first.default(get_method(method).defaults())
        assert f"({', '.join(m for m, _ in users)}" in help_text[dest], dest
        if default is not None and not isinstance(default, bool):
            assert f"default: {default})" in help_text[dest], (dest, help_text[dest])
        flags = {mo.option.flag for _, mo in users}
        assert len(flags) == 1, f"{dest} is declared with several flags: {flags}"
        assert len({id(mo.option) for _, mo in users}) == 1, f"{dest} is declared more than once"
    assert {"top_k", "extent", "augmentations", "scheme", "transform", "lora_steps"} <= set(declarations())


def test_options_left_out_leave_the_method_its_own_defaults_and_given_ones_reach_their_parameter():
    args = _parse("--support", "s.nii.gz", "s_label.nii.gz")
    request = request_from_args(args)
    assert request.method == "matched-support" and request.params == {}
    assert get_method("matched-support").params(request.params) == FewShotParams()
    guided = request_from_args(_parse("--support", "s.nii.gz", "l.nii.gz", "--method", "guided", "--top-k", "2",
                                      "--prior-scheme", "pair", "--lora-decoder", "--transform", "affine_bspline"))
    assert guided.params == {"fewshot": {"top_k": 2, "scheme": "pair"}, "lora": {"decoder": True},
                             "transform": "affine_bspline"}
    params = get_method("guided").params(guided.params)
    assert params.fewshot.top_k == 2 and params.fewshot.augmentations == FewShotParams().augmentations
    retrieval = request_from_args(_parse("--library", str(MODULE), "--top-k", "5", "--position-window", "0.2"))
    assert retrieval.params == {"top_k": 5, "window": 0.2}
    with pytest.raises(InputError, match="--scheme does not apply to the registration method"):
        request_from_args(_parse("--support", "s", "l", "--method", "registration", "--scheme", "pair"))
    with pytest.raises(InputError, match="--lora-steps does not apply to the matched-support method"):
        request_from_args(_parse("--support", "s", "l", "--lora-steps", "3"))


def test_the_panel_and_its_parameter_node_take_the_engines_defaults():
    choices, fewshot = panel.PanelChoices(), FewShotParams()
    assert (choices.scheme, choices.augmentations, choices.top_k) == (fewshot.scheme, fewshot.augmentations,
                                                                      fewshot.top_k)
    assert choices.top_k == MemoryParams().top_k  # retrieval's too
    assert (choices.device, choices.seed) == (ModelOptions().device, ModelOptions().seed)
    assert (choices.axis, choices.normalization) == (FrameOptions().axis, FrameOptions().normalization)
    # the parameter node (Qt side, not importable here) writes no default of its own: each is PanelChoices'
    tree = ast.parse((MODULE / "SAM2FewShotPanel" / "logic.py").read_text())
    wrapper = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SAM2FewShotParameterNode")
    defaults = {a.target.id: ast.unparse(a.value) for a in wrapper.body if isinstance(a, ast.AnnAssign) and a.value}
    fields = {f.name for f in dataclasses.fields(panel.PanelChoices)}
    for name in ("scheme", "augmentations", "topK", "device", "axis", "precision", "normalization"):
        field = {"topK": "top_k"}.get(name, name)
        assert field in fields and defaults[name] == f"PanelChoices.{field}", (name, defaults[name])
    assert defaults["method"] == "MethodChoice(PanelChoices.method)"


def test_the_panel_sends_each_method_the_options_it_declares(tmp_path):
    choices = panel.PanelChoices(scheme="pair", augmentations=2, top_k=5)
    params = {m: panel.build_job("j", dataclasses.replace(choices, method=m), tmp_path, tmp_path / "q.nrrd").params
              for m in METHODS}
    assert params["matched-support"] == {"scheme": "pair", "augmentations": 2, "top_k": 5}
    assert params["retrieval"] == {"top_k": 5}
    assert params["guided"] == {"fewshot": {"augmentations": 2, "top_k": 5}}
    assert params["propagate"] == {} and params["registration"] == {}
    for method, values in params.items():
        get_method(method).params(values)  # every one of them is a valid parameter set


def test_every_option_the_panel_offers_has_its_widget():
    """The .ui keeps its widgets; each option the panel shows is bound (SlicerParameterName) to the
    parameter-node field named like the PanelChoices field (top_k: topK)."""
    root = ET.parse(MODULE / "Resources" / "UI" / "SAM2FewShot.ui").getroot()
    bound = {w.findtext("property[@name='SlicerParameterName']/string") for w in root.iter("widget")}
    for field in panel.PANEL_OPTIONS:
        head, *rest = field.split("_")
        assert head + "".join(p.title() for p in rest) in bound, field


def test_the_bench_and_the_demo_leave_unset_options_to_the_method():
    parser = build_parser()
    bench = parser.parse_args(["bench", "--data", "d", "--out", "o"])
    assert all(getattr(bench, o) is None for o in ("augmentations", "slices_per_structure", "features", "top_k"))
    demo = parser.parse_args(["demo"])
    assert demo.scheme is None
    bench_help = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["bench"]._actions}
    assert f"(default: {FewShotParams().augmentations})" in bench_help["augmentations"]
