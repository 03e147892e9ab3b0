"""Bad input and faults, as one maintained matrix, against every method of `sam2fewshot segment`.

Each refused case: exit code 2, exactly one line on the terminal (C-level output included), no
file left behind, every input byte-identical. Cases handled by a stated rule finish and say so.
Faults: a full disk, signals mid-run, a malicious pickle, two runs writing one output at once,
the worker under malformed requests. Real files, the real CLI (in-process and as subprocesses),
the real SAM2 architecture with random weights at 128 px.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
from phantoms import phantom
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.common.files import replacing
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume

RANDOM = ["--random-weights", "--image-size", "128", "--device", "cpu"]
SHAPE = (8, 32, 32)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
METHODS = ("propagate", "matched-support", "registration", "guided", "retrieval")


def _nrrd(path: Path, directions: str, size: int = 8) -> None:
    """A raw NRRD with hand-written space directions (what SimpleITK's writer would refuse to write)."""
    head = (f"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: {size} {size} {size}\n"
            f"space directions: {directions}\nspace origin: (0,0,0)\nencoding: raw\nendian: little\n\n")
    path.write_bytes(head.encode() + np.random.default_rng(0).normal(size=size ** 3).astype(np.float32).tobytes())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good inputs of every kind, and a bad twin of each."""
    d = tmp_path_factory.mktemp("matrix")
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
                "matched-support": [("LoRA without guided", lambda d: {"--lora-steps": ["3"]}, "--lora-steps works")]}
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


def _snapshot(d: Path) -> dict:
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir") for p in d.rglob("*")
            if ".sam2fewshot_index" not in p.parts}


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


# --- faults -------------------------------------------------------------------------------------------


def _cli(argv, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "SAM2FewShotLib.cli", "segment", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **kwargs)


def _limit_file_size(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.skipif(sys.platform != "linux", reason="uses a file-size limit (Linux)")
def test_a_full_disk_leaves_the_old_result_whole_and_says_so_in_one_line(world, tmp_path):
    out = tmp_path / "result.nii"  # uncompressed: larger than the limit below
    argv = [*_inputs("registration", world), "--out", out, "-q"]
    first = _cli(argv)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    before = _snapshot(tmp_path)
    full = _cli(argv, preexec_fn=_limit_file_size(4000))
    assert full.wait(timeout=120) == 2
    [line] = full.stderr.read().strip().splitlines()
    assert line.startswith("sam2fewshot: error: cannot write"), line
    assert _snapshot(tmp_path) == before, "the old label file, sidecar and report are intact; no temporary is left"


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_signal_mid_run_leaves_no_output_and_the_old_one_whole(world, tmp_path, signum, code):
    big, truth = phantom((40, 48, 48), spacing=(1.0, 1.0, 3.0))
    write_volume(big, tmp_path / "big.nrrd")
    prompt = np.zeros_like(truth.volume.array)
    prompt[20] = truth.volume.array[20]
    write_labels(truth.with_array(prompt), tmp_path / "big_prompt.nii.gz")
    out = tmp_path / "result.nii.gz"
    old = b"an earlier result"
    out.write_bytes(old)
    # A suite started in the background (`pytest &`) runs with SIGINT ignored, and a child would inherit
    # that (Python then installs no KeyboardInterrupt handler): the CLI starts as a terminal starts it.
    run = _cli(["--query", tmp_path / "big.nrrd", "--prompt-labels", tmp_path / "big_prompt.nii.gz", "--out", out,
                "--report", tmp_path / "report.json", *RANDOM],
               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    seen = ""
    while "propagate" not in seen and time.monotonic() < deadline and run.poll() is None:
        seen += run.stderr.read(1)  # the progress bars: it is computing now
    os.kill(run.pid, signum)
    assert run.wait(timeout=30) == code
    err = run.stderr.read().strip().splitlines()
    if signum != signal.SIGKILL:
        assert err[-1] == {signal.SIGINT: "sam2fewshot: interrupted", signal.SIGTERM: "sam2fewshot: terminated"}[signum]
        assert not any("Traceback" in line for line in err)
    assert out.read_bytes() == old and not (tmp_path / "report.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary is left"


def test_a_killed_writers_temporaries_are_swept_by_the_next_run(world, tmp_path):
    out = tmp_path / "r.nii.gz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f".r.nii.gz.{dead.stdout.strip()}.abc123.tmp.nii.gz",
             tmp_path / f".r_report.json.{dead.stdout.strip()}.def456.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    live = tmp_path / f".r.nii.gz.{os.getpid()}.xyz789.tmp.nii.gz"  # a writer still running: left alone
    live.write_bytes(b"being written")
    assert main(["segment", *_inputs("registration", world), "--out", str(out), "-q"]) == 0
    assert not any(p.exists() for p in stale) and live.exists()
    assert read_labels(out).volume.array.any()


def test_a_malicious_pickle_as_checkpoint_runs_no_code(world, tmp_path, capfd):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Evil()}))
    argv = [*_inputs("propagate", world), "--checkpoint", str(tmp_path / "evil.pt"), "--config",
            "configs/sam2.1/sam2.1_hiera_t.yaml", "--image-size", "128", "--device", "cpu", "--out",
            str(tmp_path / "o.nii.gz"), "-q"]
    assert main(["segment", *argv]) == 2
    [line] = capfd.readouterr().err.strip().splitlines()
    assert "refusing to load evil.pt" in line and not marker.exists()


def test_two_runs_writing_one_output_at_once_leave_one_complete_result(world, tmp_path):
    out = tmp_path / "same.nii.gz"
    runs = [_cli([*_inputs("registration", world), "--out", out, "-q"]) for _ in range(2)]
    assert [r.wait(timeout=120) for r in runs] == [0, 0], [r.stderr.read() for r in runs]
    labels = read_labels(out)  # complete: readable, with its sidecar's names, from one of the runs
    assert labels.volume.array.any() and json.loads((tmp_path / "same_report.json").read_text())["method"] == \
        "registration"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.json", "same.nii.gz", "same_report.json"]


def test_replacing_never_leaves_half_a_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the disk filled up")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


# --- the worker ---------------------------------------------------------------------------------------


def test_the_worker_answers_every_malformed_request_and_its_memory_stays_flat(world, tmp_path):
    job = {"type": "job", "method": "propagate", "query": str(world / "q.nrrd"),
           "prompt_labels": str(world / "p.nii.gz"), "out": str(tmp_path / "o.seg.nrrd"),
           "report": str(tmp_path / "r.json"), "model": {"random_weights": True, "image_size": 128, "device": "cpu"}}
    bad = ["{ not json", "[" * 1000 + "]" * 1000, '{"type": "job", "id": "deep", "params": ' + "[" * 1000 + "]" * 1000
           + "}", json.dumps({**job, "id": "unknown-field", "telepathy": 1}),
           json.dumps({**job, "id": "huge", "query": "x" * (10 << 20)})]
    failing = [json.dumps({**job, "id": f"fail{n}", "query": str(world / "const.nrrd")}) for n in range(10)]
    log = (tmp_path / "worker.log").open("w+")  # the worker's stderr, never left to fill a pipe
    worker = subprocess.Popen([sys.executable, "-m", "SAM2FewShotLib.run.worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True, env=ENV)

    def ask(line: str) -> dict:
        worker.stdin.write(line + "\n")
        worker.stdin.flush()
        while True:
            event = json.loads(worker.stdout.readline())
            if event["event"] in ("result", "error"):
                return event

    assert json.loads(worker.stdout.readline())["event"] == "ready"
    answers = [ask(line) for line in bad]
    assert [a["event"] for a in answers] == ["error"] * len(bad)
    assert [a["id"] for a in answers] == [None, None, None, "unknown-field", "huge"]
    assert "not a usable file name" in answers[-1]["message"]
    assert all("\n" not in a["message"] and len(a["message"]) <= 600 for a in answers)
    ask(failing[0])
    rss = psutil.Process(worker.pid).memory_info().rss
    answers = [ask(line) for line in failing[1:]]
    assert all(a["event"] == "error" and "nothing to segment" in a["message"] for a in answers)
    grown = (psutil.Process(worker.pid).memory_info().rss - rss) / 2 ** 20
    assert grown < 20, f"the worker grew by {grown:.1f} MB over 9 failing jobs"
    assert ask(json.dumps({**job, "id": "fine"}))["event"] == "result"  # still alive and working
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 130
    log.seek(0)
    assert "Traceback" not in log.read()
