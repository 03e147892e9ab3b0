"""The inputs of the bad-input matrix and of the faults: good inputs of every kind and a bad twin of each, and
the run options of every method. Shared by the two test modules beside it."""


from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from phantoms import phantom
from SAM2FewShotLib.io.volume_io import write_labels, write_volume

RANDOM = ["--random-weights", "--image-size", "128", "--device", "cpu"]
SHAPE = (8, 32, 32)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
METHODS = ("propagate", "matched-support", "registration", "guided", "retrieval")


def _nrrd(path: Path, directions: str, size: int = 8) -> None:
    """A raw NRRD with hand-written space directions (what SimpleITK's writer would refuse to write)."""
    head = (f"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: {size} {size} {size}\n"
            f"space directions: {directions}\nspace origin: (0,0,0)\nencoding: raw\nendian: little\n\n")
    path.write_bytes(head.encode() + np.random.default_rng(0).normal(size=size ** 3).astype(np.float32).tobytes())


def make_world(d: Path) -> Path:
    """Good inputs of every kind, and a bad twin of each, in ``d``."""
    image, truth = phantom(SHAPE, spacing=(1.0, 1.0, 3.0))
    support, support_labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=1)
    prompt = np.zeros_like(truth.volume.array)
    prompt[4] = truth.volume.array[4]
    write_volume(image, d / "q.nrrd")
    write_labels(truth.with_array(prompt), d / "p.nii.gz")
    write_volume(support, d / "s.nrrd")
    write_labels(support_labels, d / "s_label.nii.gz")
    (d / "lib").mkdir()
    (d / "lib" / "library.json").write_text(json.dumps({"cases": [{"image": str(d / "s.nrrd"),
                                                                   "labels": str(d / "s_label.nii.gz")}]}))
    (d / "prompts.json").write_text(json.dumps({"prompts": [{"label": 1, "box_ijk": [[8, 8, 4], [20, 20, 4]]}]}))
    # bad volumes
    arr = image.array
    write_volume(image.with_array(np.full_like(arr, np.nan)), d / "allnan.nrrd")
    write_volume(image.with_array(np.zeros_like(arr)), d / "zero.nrrd")
    write_volume(image.with_array(np.full_like(arr, 7.0)), d / "const.nrrd")
    somenan = arr.copy()
    somenan[2, 3, 4], somenan[3, 5, 5], somenan[5, 1, 1] = np.nan, np.inf, -np.inf
    write_volume(image.with_array(somenan), d / "somenan.nrrd")
    _nrrd(d / "zerospacing.nrrd", "(1,0,0) (0,0,0) (0,0,1)")
    _nrrd(d / "skewed.nrrd", "(1,0,0) (1,1,0) (0,0,1)")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(d / "flat.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 8, 32, 32), np.float32), isVector=False), str(d / "t4d.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 32, 32, 3), np.uint8), isVector=True), str(d / "rgb.nrrd"))
    whole = (d / "q.nrrd").read_bytes()
    (d / "cut.nrrd").write_bytes(whole[: len(whole) // 2])
    (d / "junk.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    (d / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (d / "x.nii.gz").mkdir()
    (d / "emptydir").mkdir()
    # bad label files
    other = sitk.GetImageFromArray(np.zeros(SHAPE, np.uint8))
    other.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(other, str(d / "othergrid.nii.gz"))
    for name, values in (("frac", 1.5), ("neg", -1.0), ("huge", 70000.0), ("e30", 1e30)):
        lab = np.zeros(SHAPE, np.float32)
        lab[4, 10:20, 10:20] = values
        write_volume(image.with_array(lab), d / f"{name}_labels.nrrd")
    write_labels(truth.with_array(np.zeros_like(prompt)), d / "empty_labels.nii.gz")
    # bad prompt files
    bad_prompts = {
        "prompts_notjson.json": "{ not json",
        "prompts_nested.json": "[" * 1000 + "]" * 1000,
        "prompts_none.json": json.dumps({"prompts": []}),
        "prompts_label0.json": json.dumps({"prompts": [{"label": 0, "box_ijk": [[8, 8, 4], [20, 20, 4]]}]}),
        "prompts_label1e30.json": json.dumps({"prompts": [{"label": 1e30, "box_ijk": [[8, 8, 4], [20, 20, 4]]}]}),
        "prompts_labelfrac.json": json.dumps({"prompts": [{"label": 1.5, "box_ijk": [[8, 8, 4], [20, 20, 4]]}]}),
        "prompts_nan.json": '{"prompts": [{"label": 1, "points_ijk": [[NaN, 8, 4]]}]}',
        "prompts_pointlabels.json": json.dumps({"prompts": [{"label": 1, "points_ijk": [[8, 8, 4], [9, 9, 4]],
                                                             "point_labels": [1]}]}),
        "prompts_box3.json": json.dumps({"prompts": [{"label": 1, "box_ijk": [[8, 8, 4], [9, 9, 4], [10, 10, 4]]}]}),
        "prompts_outside.json": json.dumps({"prompts": [{"label": 1, "box_ijk": [[8, 8, 4], [90, 20, 4]]}]}),
        "prompts_twoslices.json": json.dumps({"prompts": [{"label": 1, "box_ijk": [[8, 8, 3], [20, 20, 4]]}]}),
    }
    for name, text in bad_prompts.items():
        (d / name).write_text(text)
    (d / "prompts_folder.json").mkdir()
    (d / "corrupt.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (d / "a_file").write_text("x")
    return d


def _options(method: str, d: Path, query: str = "q.nrrd") -> dict[str, list[str]]:
    """A good run of ``method``, option by option; a case replaces some of them."""
    options = {"--query": [str(d / query)], "--out": [str(d / "o.nii.gz")]}
    if method == "propagate":
        return {**options, "--prompt-labels": [str(d / "p.nii.gz")]}
    if method == "retrieval":
        return {**options, "--library": [str(d / "lib")]}
    return {**options, "--support": [str(d / "s.nrrd"), str(d / "s_label.nii.gz")], "--method": [method]}


def _argv(options: dict[str, list[str]]) -> list[str]:
    """The options as arguments; an option a case sets to None is left out."""
    return [str(a) for key, values in options.items() if values is not None for a in (key, *values)]


def _inputs(method: str, d: Path, query: str = "q.nrrd") -> list[str]:
    options = _options(method, d, query)
    options.pop("--out")
    return _argv(options)


def _snapshot(d: Path) -> dict:
    """Every file under ``d`` with its content digest: what a refused run must leave as it found."""
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir") for p in d.rglob("*")
            if ".sam2fewshot_index" not in p.parts}


def _cli(argv, **kwargs):
    """`sam2fewshot segment` as a subprocess (one torch thread, offline)."""
    return subprocess.Popen([sys.executable, "-m", "SAM2FewShotLib.cli", "segment", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace", env=ENV, **kwargs)  # the bars are UTF-8 whatever the locale
