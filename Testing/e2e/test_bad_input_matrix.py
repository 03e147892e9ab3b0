"""Bad input as one maintained matrix, against every method of `sam2fewshot segment`.

Each refused case: exit code 2, exactly one line on the terminal (C-level output included), no
file left behind, every input byte-identical. Cases handled by a stated rule finish and say so.
Real files, the real CLI, the real SAM2 architecture with random weights at 128 px.
"""

from __future__ import annotations

import json

import pytest

from matrix_inputs import METHODS, RANDOM, _argv, _cli, _inputs, _options, _snapshot
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.io.volume_io import read_labels

# (name, methods it applies to, argv builder, expected words in the one line)
QUERY_CASES = [
    ("missing query", lambda d: {"--query": [str(d / "missing.nrrd")]}, "does not exist"),
    ("2D image", lambda d: {"--query": [str(d / "flat.nii.gz")]}, "2D"),
    ("4D image", lambda d: {"--query": [str(d / "t4d.nii.gz")]}, "4D"),
    ("colour image", lambda d: {"--query": [str(d / "rgb.nrrd")]}, "3 components"),
    ("truncated file", lambda d: {"--query": [str(d / "cut.nrrd")]}, "cannot read"),
    ("junk file", lambda d: {"--query": [str(d / "junk.nrrd")]}, "cannot read"),
    ("png image", lambda d: {"--query": [str(d / "img.png")]}, "unknown image format"),
    ("folder named like a file", lambda d: {"--query": [str(d / "x.nii.gz")]}, "no DICOM series"),
    ("empty folder", lambda d: {"--query": [str(d / "emptydir")]}, "no DICOM series"),
    ("all-NaN volume", lambda d: {"--query": [str(d / "allnan.nrrd")]}, "no finite voxel"),
    ("all-zero volume", lambda d: {"--query": [str(d / "zero.nrrd")]}, "nothing to segment"),
    ("constant volume", lambda d: {"--query": [str(d / "const.nrrd")]}, "nothing to segment"),
    ("zero spacing", lambda d: {"--query": [str(d / "zerospacing.nrrd")]}, "spacing"),
    ("non-orthonormal direction", lambda d: {"--query": [str(d / "skewed.nrrd")]}, "not orthonormal"),
]
OUTPUT_CASES = [
    ("png output", lambda d: {"--out": [str(d / "o.png")]}, "cannot write"),
    ("nhdr output", lambda d: {"--out": [str(d / "o.nhdr")]}, "cannot write"),
    ("output without suffix", lambda d: {"--out": [str(d / "o")]}, "cannot write"),
    ("output in a missing folder", lambda d: {"--out": [str(d / "missing" / "o.nii.gz")]}, "does not exist"),
    ("output under a file", lambda d: {"--out": [str(d / "a_file" / "o.nii.gz")]}, "cannot write"),
    ("output is a folder", lambda d: {"--out": [str(d / "emptydir")]}, "cannot write"),
    ("output is the query", lambda d: {"--out": [str(d / "q.nrrd")]}, "also an input"),
    ("report is the output", lambda d: {"--out": [str(d / "o.nii.gz"), "--report", str(d / "o.nii.gz")]},
     "would overwrite"),
    ("report is the sidecar", lambda d: {"--out": [str(d / "o.nii.gz"), "--report", str(d / "o.json")]},
     "would overwrite"),
]
OPTION_CASES = [
    ("image size 0", lambda d: {"--image-size": ["0"]}, "multiple of 64"),
    ("image size 100", lambda d: {"--image-size": ["100"]}, "multiple of 64"),
    ("unknown model", lambda d: {"--model": ["sam9-huge"]}, "unknown model"),
    ("bad normalisation", lambda d: {"--normalization": ["sepia"]}, "unknown normalisation"),
    ("unknown axis", lambda d: {"--axis": ["diagonal"]}, "invalid choice"),
    ("slice range reversed", lambda d: {"--slice-range": ["5", "2"]}, "first <= last"),
    ("slice range beyond the volume", lambda d: {"--slice-range": ["0", "99"]}, "outside"),
    ("unknown parameter", lambda d: {"--param": ["telepathy=1"]}, "unknown parameter"),
    ("malformed parameter", lambda d: {"--param": ["novalue"]}, "NAME=VALUE"),
    ("corrupt checkpoint", lambda d: {"--checkpoint": [str(d / "corrupt.pt")], "--random-weights": None},
     "checkpoint"),
    ("checkpoint and random weights", lambda d: {"--checkpoint": [str(d / "corrupt.pt")]}, "exclude each other"),
]
METHOD_CASES = {
    "propagate": [
        ("prompt labels on another grid", lambda d: {"--prompt-labels": [str(d / "othergrid.nii.gz")]},
         "different grids"),
        ("empty prompt labels", lambda d: {"--prompt-labels": [str(d / "empty_labels.nii.gz")]}, "no labelled voxel"),
        ("fractional labels", lambda d: {"--prompt-labels": [str(d / "frac_labels.nrrd")]}, "fractional"),
        ("negative labels", lambda d: {"--prompt-labels": [str(d / "neg_labels.nrrd")]}, "negative"),
        ("label 70000", lambda d: {"--prompt-labels": [str(d / "huge_labels.nrrd")]}, "up to 65535"),
        ("label 1e30", lambda d: {"--prompt-labels": [str(d / "e30_labels.nrrd")]}, "up to 65535"),
        ("--labels a,b", lambda d: {"--labels": ["a,b"]}, "comma-separated"),
        ("--labels of a missing value", lambda d: {"--labels": ["7"]}, "label value 7 does not exist"),
        ("prompts file is a folder", lambda d: {"--prompts": [str(d / "prompts_folder.json")]}, "cannot read"),
        *[(f"prompts file: {n[8:-5]}", lambda d, n=n: {"--prompts": [str(d / n)]}, w) for n, w in (
            ("prompts_notjson.json", "not valid JSON"), ("prompts_nested.json", "not valid JSON"),
            ("prompts_none.json", "holds no prompts"), ("prompts_label0.json", "whole number from 1"),
            ("prompts_label1e30.json", "whole number from 1"), ("prompts_labelfrac.json", "whole number from 1"),
            ("prompts_nan.json", "not a finite number"), ("prompts_pointlabels.json", "point_labels"),
            ("prompts_box3.json", "list of 2"), ("prompts_outside.json", "outside the volume"),
            ("prompts_twoslices.json", "one slice"))],
    ],
    "support": [
        ("support labels on another grid", lambda d: {"--support": [str(d / "s.nrrd"), str(d / "othergrid.nii.gz")]},
         "different grids"),
        ("empty support labels", lambda d: {"--support": [str(d / "s.nrrd"), str(d / "empty_labels.nii.gz")]},
         "no labelled voxel"),
        ("support label 70000", lambda d: {"--support": [str(d / "s.nrrd"), str(d / "huge_labels.nrrd")]}, "65535"),
        ("constant support image", lambda d: {"--support": [str(d / "const.nrrd"), str(d / "s_label.nii.gz")]},
         "nothing to segment"),
        ("missing support", lambda d: {"--support": [str(d / "nope.nrrd"), str(d / "s_label.nii.gz")]},
         "does not exist"),
        ("support and library", lambda d: {"--library": [str(d / "lib")]}, "give one of"),
        ("top-k 0", lambda d: {"--top-k": ["0"]}, "top-k"),
        ("augmentations 0", lambda d: {"--augmentations": ["0"]}, "augmentations"),
    ],
}
SUPPORT_ONLY = {"guided": [("negative box margin", lambda d: {"--box-margin": ["-1"]}, "box margin")],
                "registration": [("slice range", lambda d: {"--slice-range": ["1", "2"]}, "takes no slice range"),
                                 ("a matched-support option", lambda d: {"--scheme": ["pair"]}, "does not apply")],
                "matched-support": [("LoRA without guided", lambda d: {"--lora-steps": ["3"]},
                                     "--lora-steps does not apply")]}
GENERAL = [
    ("nothing to segment from", lambda d: {"--query": [str(d / "q.nrrd")], "--out": [str(d / "o.nii.gz")]},
     "nothing to segment from"),
    ("--method without supports", lambda d: {**_options("propagate", d), "--method": ["guided"]},
     "--method guided needs --support"),
    ("unknown scheme", lambda d: {**_options("matched-support", d), "--scheme": ["teleport"]}, "invalid choice"),
]


def _cases():
    for method in METHODS:
        specific = METHOD_CASES["propagate"] if method == "propagate" else \
            METHOD_CASES["support"] if method in ("matched-support", "registration", "guided") else []
        for name, build, words in QUERY_CASES + OUTPUT_CASES + OPTION_CASES + specific + SUPPORT_ONLY.get(method, []):
            if method == "registration" and name in {"image size 0", "image size 100", "unknown model",
                                                     "corrupt checkpoint", "checkpoint and random weights",
                                                     "slice range reversed",
                                                     "slice range beyond the volume"}:
                continue  # registration loads no model and takes no slice range: its own case covers it
            yield pytest.param(method, build, words, id=f"{method}: {name}")
    for name, build, words in GENERAL:
        yield pytest.param(None, build, words, id=name)


@pytest.mark.parametrize("method, build, words", list(_cases()))
def test_refused_in_one_line_with_nothing_left_and_inputs_unchanged(world, method, build, words, capfd):
    quick = {"--random-weights": [], "--image-size": ["128"], "--device": ["cpu"], "-q": []}
    options = {**quick, **build(world)} if method is None else {**quick, **_options(method, world), **build(world)}
    argv = _argv(options)
    before = _snapshot(world)
    code = main(["segment", *argv])
    err = capfd.readouterr().err
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sam2fewshot: error:"), lines
    assert words.lower() in lines[0].lower(), lines[0]
    assert _snapshot(world) == before, "a refused run changed or left files"


# --- handled by a stated rule -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["propagate", "registration"])
def test_nan_and_infinite_voxels_are_handled_by_the_stated_rule(world, tmp_path, method):
    out = tmp_path / "o.nii.gz"
    run = _cli([*_inputs(method, world, query="somenan.nrrd"), "--out", out, *RANDOM, "-q"])
    assert run.wait(timeout=120) == 0, run.stderr.read()
    [warning] = run.stderr.read().strip().splitlines()  # one line says what was done
    assert "3 voxels are NaN or infinite" in warning and "the file is not changed" in warning
    report = json.loads((tmp_path / "o_report.json").read_text())
    [note] = report["input_notes"]
    assert note["non_finite_voxels"] == 3 and "lowest finite value" in note["rule"]
    assert read_labels(out).volume.same_grid(read_labels(world / "p.nii.gz").volume)
