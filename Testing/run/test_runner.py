"""One request, one runner: the Request every front end builds, the Runner that checks, loads once,
keeps queries warm and dispatches through the method registry, and the output writer.

Real sam2.1 tiny architecture with random weights at 128 px, real files, real subprocess-free runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from phantoms import phantom
from SAM2FewShotLib.cli.main import build_parser, main
from SAM2FewShotLib.cli.segment import request_from_args
from SAM2FewShotLib.common.errors import InputError, ModelError
from SAM2FewShotLib.io.volume import LabelMap, Segment
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume
from SAM2FewShotLib.methods import registry
from SAM2FewShotLib.methods.registry import (
    METHODS,
    SUPPORTS,
    MethodSpec,
    dataclass_from_json,
    get_method,
)
from SAM2FewShotLib.run.outputs import check_outputs, write_outputs
from SAM2FewShotLib.run.protocol import Job, encode, parse_request
from SAM2FewShotLib.run.request import FrameOptions, Request
from SAM2FewShotLib.run.runner import Runner, check_request
from SAM2FewShotLib.sam2.build import ModelOptions
from SAM2FewShotLib.slicer import panel

MODEL = ModelOptions(random_weights=True, image_size=128, device="cpu")
METHODS_DIR = Path(registry.__file__).parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    image, truth = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0))
    support, support_labels = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0), seed=1)
    prompt = np.zeros_like(truth.volume.array)
    prompt[3] = truth.volume.array[3]
    paths = {"query": root / "query.nrrd", "prompt": root / "prompt.seg.nrrd", "support": root / "support.nrrd",
             "support_labels": root / "support_labels.nii.gz"}
    write_volume(image, paths["query"])
    write_labels(truth.with_array(prompt), paths["prompt"])
    write_volume(support, paths["support"])
    write_labels(support_labels, paths["support_labels"])
    return {k: str(v) for k, v in paths.items()} | {"image": image}


# --- the registry: one module and one line per method ----------------------------------------------


def test_every_registered_method_is_one_module_with_params_and_run():
    modules = {p.stem for p in METHODS_DIR.glob("*.py")} - {"__init__", "registry", "common", "presets", "options",
                                                           "memory_conditioned"}  # what methods share
    assert modules == {key.replace("-", "_") for key in METHODS}, "every module in methods/ is a registered method"
    for spec in METHODS.values():
        module = spec.load()
        assert dataclasses.is_dataclass(module.Params) and callable(module.run), spec.key
        module.Params().check()  # the defaults are valid
        assert spec.params({}).__class__ is module.Params


def test_a_new_method_takes_one_module_and_one_registration_line(files, tmp_path, monkeypatch, capsys):
    """A method written the way the README says (a module, one MethodSpec line) runs through the
    Runner and the CLI with no other change: here a weight-free one that copies the supports' first
    structure box onto the query."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        value: int = 7
        seed: int = 0

        def check(self) -> None:
            if self.value < 1:
                raise InputError("value must be at least 1")

    def run(inputs, params):
        image, labels = inputs.supports[0]
        out = np.where(labels.volume.array > 0, params.value, 0).astype(np.uint8)
        report = {"method": "copy-support", "seed": params.seed, "timing": {"total_s": 0.0, "per_slice_s": 0.0}}
        return LabelMap(inputs.query.with_array(out), (Segment(params.value, "copied"),)), report

    module = types.ModuleType("SAM2FewShotLib.methods.copy_support")
    module.Params, module.run = Params, run
    monkeypatch.setitem(sys.modules, module.__name__, module)  # as if methods/copy_support.py were there
    monkeypatch.setitem(METHODS, "copy-support", MethodSpec("copy-support", "Copy support", SUPPORTS, False, "test"))

    request = Request(method="copy-support", query=files["query"],
                      supports=((files["support"], files["support_labels"]),),
                      model=dataclasses.replace(MODEL, seed=5), params={"value": 3})
    labels, report = Runner().run(request)
    assert labels.volume.same_grid(files["image"]) and set(np.unique(labels.volume.array)) == {0, 3}
    assert report["seed"] == 5 and report["model"]["weights"] is None  # the request's seed; no model loaded
    assert "copy-support" in [m.key for m in METHODS.values()]  # the panel lists it

    out = tmp_path / "copied.nii.gz"
    code = main(["segment", "--query", files["query"], "--support", files["support"], files["support_labels"],
                 "--method", "copy-support", "--param", "value=4", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    assert set(np.unique(read_labels(out).volume.array)) == {0, 4}
    assert main(["segment", "--query", files["query"], "--support", files["support"], files["support_labels"],
                 "--method", "copy-support", "--param", "value=0", "--out", str(out), "-q"]) == 2
    assert "value must be at least 1" in capsys.readouterr().err


# --- parameters from JSON ----------------------------------------------------------------------------


def test_parameters_are_typed_checked_and_seeded_nested_groups_included():
    guided = get_method("guided").params({"prior": "sam2", "fewshot": {"top_k": 2}, "lora": {"rank": 8}}, seed=9)
    assert guided.prior == "sam2" and guided.fewshot.top_k == 2 and guided.lora.rank == 8
    assert guided.fewshot.scheme == "video"  # the group's own default in GuidedParams, not FewShotParams'
    assert guided.fewshot.seed == 9 and guided.lora.seed == 9  # the request's seed reaches nested groups
    assert get_method("matched-support").params({"seed": 3}, seed=9).seed == 3  # an explicit seed wins
    assert get_method("retrieval").params({"window": 1}).window == 1.0  # an int stands for a float
    for values, message in (({"top_k": "three"}, "top_k must be a int"), ({"nope": 1}, "unknown parameter"),
                            ({"top_k": True}, "top_k must be a int"), ({"fewshot": 3}, "must be a mapping"),
                            ({"scheme": "teleport"}, "unknown scheme")):
        method = "guided" if "fewshot" in values else "matched-support"
        with pytest.raises(InputError, match=message):
            get_method(method).params(values)
    with pytest.raises(InputError, match="unknown parameter"):  # set from the request's frames, never by hand
        get_method("retrieval").params({"normalization": {"mode": "auto"}})
    with pytest.raises(InputError, match="unknown method 'telepathy'"):
        get_method("telepathy")
    base = dataclasses.make_dataclass("P", [("a", int, dataclasses.field(default=1))])()
    assert dataclass_from_json(base, {"a": 2}).a == 2


# --- every front end builds the same request ----------------------------------------------------------


def test_cli_and_panel_requests_mean_the_same_run(files, tmp_path):
    args = build_parser().parse_args(["segment", "--query", files["query"], "--support", files["support"],
                                      files["support_labels"], "--scheme", "pair", "--top-k", "2", "--augmentations",
                                      "3", "--axis", "coronal", "--normalization", "lung", "--slice-range", "2", "5",
                                      "--random-weights", "--image-size", "128", "--device", "cpu",
                                      "--out", str(tmp_path / "o.seg.nrrd")])
    cli = request_from_args(args)
    choices = panel.PanelChoices(method="matched-support", device="cpu", random_weights=True, image_size=128, top_k=2,
                                 augmentations=3, scheme="pair", axis="coronal", normalization="lung",
                                 slice_range=(2, 5))
    job = panel.build_job("j", choices, tmp_path, Path(files["query"]),
                          supports=[(Path(files["support"]), Path(files["support_labels"]))])
    worker = parse_request(encode(job.to_message()))  # what the worker receives
    assert (cli.method, cli.query, cli.supports, cli.model, cli.frames) == \
        (worker.method, worker.query, worker.supports, worker.model, worker.frames)
    assert check_request(cli)[1] == check_request(worker)[1]  # the same typed parameters
    assert cli.report == str(tmp_path / "o_report.json")


# --- the runner ---------------------------------------------------------------------------------------


def test_bad_requests_fail_before_any_model_is_loaded(files, tmp_path):
    runner = Runner()
    support = ((files["support"], files["support_labels"]),)
    bad = [
        (Request(method="retrieval", query=files["query"], supports=support), "retrieval needs a library"),
        (Request(method="propagate", query=files["query"]), "propagate needs prompts"),
        (Request(method="matched-support", query=files["query"], supports=support, library=str(tmp_path)),
         "not by library"),
        (Request(method="registration", query=files["query"], supports=support,
                 frames=FrameOptions(slice_range=(1, 2))),
         "takes no slice range"),
        (Request(method="matched-support", query=files["query"], supports=support, params={"top_k": 0}),
         "at least 1"),
        (Request(method="matched-support", query=files["query"], supports=support,
                 model=ModelOptions(name="sam9-huge")), "unknown model"),
        (Request(method="matched-support", query=files["query"], supports=support,
                 model=ModelOptions(image_size=0)), "multiple of 64"),
        (Request(method="matched-support", query=str(tmp_path / "absent.nrrd"), supports=support), "does not exist"),
        (Request(method="propagate", query=files["query"], prompt_labels=files["prompt"], out=files["prompt"]),
         "also an input"),
        (Request(method="propagate", query=files["query"], prompt_labels=files["prompt"], out=str(tmp_path / "o.png")),
         "cannot write"),
        (Request(method="propagate", query=files["query"], prompt_labels=files["prompt"],
                 frames=FrameOptions(normalization="sepia")), "unknown normalisation"),
    ]
    for request, message in bad:
        with pytest.raises((InputError, ModelError), match=message):
            runner.run(request)
        assert runner._predictor is None, message  # refused before anything was loaded
    assert not any(tmp_path.iterdir())


def test_the_model_and_the_query_stay_warm_across_methods(files):
    runner, stages = Runner(), []
    propagate = Request(method="propagate", query=files["query"], prompt_labels=files["prompt"], model=MODEL)
    labels, first = runner.run(propagate, lambda stage, done, total: stages.append(stage))
    assert labels.volume.same_grid(files["image"]) and first["method"] == "propagate"
    assert not first["run"]["session_reused"] and first["timing"]["frames_encoded"] == 8
    assert stages[0] == "model" and "propagate forward" in stages and "propagate backward" in stages
    fewshot = Request(method="matched-support", query=files["query"], model=MODEL,
                      supports=((files["support"], files["support_labels"]),),
                      params={"augmentations": 1, "slices_per_structure": 2, "top_k": 1, "scheme": "pair"})
    stages.clear()
    labels, second = runner.run(fewshot, lambda stage, done, total: stages.append(stage))
    assert second["run"]["session_reused"] and "model" not in stages  # nothing loaded, the query not re-encoded
    assert second["fewshot"]["scheme"] == "pair" and second["model"]["weights"] == "random (seeded)"
    assert second["inputs"]["supports"] == [[files["support"], files["support_labels"]]]
    registration = dataclasses.replace(fewshot, method="registration", params={})
    labels, third = runner.run(registration)
    assert third["method"] == "registration" and third["model"]["weights"] is None
    assert third["timing"]["per_slice_s"] > 0
    runner.forget()
    assert runner._predictor is None and not runner._sessions


def test_a_session_asked_for_by_its_plane_is_the_one_runs_find(files, monkeypatch):
    """The bench encodes a query under --axis axial before its methods run with the default axis: on an
    axially acquired volume both name the same slices, so the runs find that session and nothing is
    read or encoded again."""
    runner = Runner()
    session = runner.session(files["query"], FrameOptions(axis="axial"), MODEL)
    monkeypatch.setattr(runner, "_read_query", lambda *a: pytest.fail("the query was read again"))
    runner.prepare(Request(method="propagate", query=files["query"], model=MODEL))  # a cohort's prefetch
    _, report = runner.run(Request(method="propagate", query=files["query"], prompt_labels=files["prompt"],
                                   model=MODEL))
    assert report["run"]["session_reused"] and list(runner._sessions.values()) == [session]
    runner.forget()


# --- outputs --------------------------------------------------------------------------------------------


def test_outputs_appear_together_or_leave_the_old_ones_whole(files, tmp_path):
    image, truth = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0))
    out, report = tmp_path / "result.nii.gz", tmp_path / "result_report.json"
    assert check_outputs(out) == report  # the default report path, beside the labels
    write_outputs(truth, {"run": 1}, out, report)
    assert read_labels(out).volume.same_grid(image) and json.loads(report.read_text()) == {"run": 1}
    assert (tmp_path / "result.json").is_file()  # the names and colours sidecar
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError):  # a report that cannot be written: nothing of this run stays
        write_outputs(truth.with_array(np.zeros_like(truth.volume.array)), {"run": object()}, out, report)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(InputError, match="cannot write"):  # labels that cannot be written: the old report stays
        write_outputs(truth, {"run": 2}, tmp_path / "missing" / "x.nii.gz", report)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(InputError, match="would overwrite the label file"):
        check_outputs(out, str(tmp_path / "result.json"))


# --- threads ----------------------------------------------------------------------------------------------


def test_threads_follow_the_free_cores_and_the_request(files, monkeypatch):
    import torch

    from SAM2FewShotLib.common.choices import RESERVED_CORES_ENV
    from SAM2FewShotLib.sam2 import devices

    assert devices.choose_threads(8, busy=0.2) == 8 and devices.choose_threads(8, busy=2.6) == 5
    assert devices.choose_threads(8, busy=0.0, reserved=1) == 7  # the Slicer panel's worker leaves one core
    assert devices.choose_threads(2, busy=5.0) == 1 and devices.choose_threads(1, busy=0, reserved=1) == 1
    monkeypatch.setenv(RESERVED_CORES_ENV, "1")
    assert 1 <= devices.free_cores() <= max(1, torch.get_num_threads() + 64)
    previous = torch.get_num_threads()
    try:
        runner = Runner()
        request = Request(method="propagate", query=files["query"], prompt_labels=files["prompt"],
                          model=dataclasses.replace(MODEL, threads=1))
        _, report = runner.run(request)
        assert report["model"]["threads"] == 1 == torch.get_num_threads()
        job = parse_request(encode(Job(id="j", method="propagate", query="q.nii.gz",
                                                                  out="o.nii.gz", report="o.json",
                                                                  model=request.model).to_message()))
        assert job.model.threads == 1  # the worker protocol carries it
        with pytest.raises(InputError, match="threads must be at least 1"):
            runner.run(dataclasses.replace(request, model=dataclasses.replace(MODEL, threads=0)))
    finally:
        torch.set_num_threads(previous)
