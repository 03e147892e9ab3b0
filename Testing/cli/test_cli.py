"""The sam2fewshot command line: real files, real exit codes, one-line errors, no partial output."""

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from phantoms import OBLIQUE, TEST_CONFIG, TEST_IMAGE_SIZE, phantom
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.io.volume_io import read_labels, write_labels, write_volume
from SAM2FewShotLib.sam2.build import build_video_predictor

RANDOM = ["--random-weights", "--image-size", str(TEST_IMAGE_SIZE), "--device", "cpu", "--threads", "1", "-q"]


@pytest.fixture()
def case(tmp_path):
    """An oblique phantom query and a prompt label file with its middle slice annotated."""
    image, labels = phantom(direction=OBLIQUE)
    prompt = np.zeros_like(labels.volume.array)
    prompt[6] = labels.volume.array[6]
    write_volume(image, tmp_path / "query.nrrd")
    write_labels(labels.with_array(prompt), tmp_path / "prompt.seg.nrrd")
    return tmp_path, image, labels


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def test_segment_propagate_writes_labels_and_report(case, capsys):
    d, image, labels = case
    code, err = run_cli(["segment", "--query", d / "query.nrrd", "--prompt-labels", d / "prompt.seg.nrrd",
                         "--out", d / "out.seg.nrrd", *RANDOM], capsys)
    assert code == 0, err
    out = read_labels(d / "out.seg.nrrd", reference=image)
    assert out.volume.same_grid(image)
    assert [(s.value, s.name) for s in out.segments] == [(1, "structure_1"), (2, "structure_2")]
    assert np.array_equal(out.volume.array[6], labels.volume.array[6])  # the prompt, verbatim
    report = json.loads((d / "out_report.json").read_text())
    assert report["method"] == "propagate" and report["model"]["weights"] == "random (seeded)"
    assert len(report["slices"]) == 12
    assert report["slices"][6]["objects"]["structure_1"]["source"] == "mask prompt"
    assert all(isinstance(e["time_s"], float) for e in report["slices"])


def test_box_and_point_prompts_from_json(case, capsys):
    d, image, _ = case
    (d / "prompts.json").write_text(json.dumps({"prompts": [
        {"label": 3, "box_ijk": [[10, 8, 4], [30, 20, 4]]},
        {"label": 4, "points_ijk": [[20, 25, 9], [5, 5, 9]], "point_labels": [1, 0]}]}))
    code, err = run_cli(["segment", "--query", d / "query.nrrd", "--prompts", d / "prompts.json",
                         "--out", d / "boxes.nii.gz", *RANDOM], capsys)
    assert code == 0, err
    report = json.loads((d / "boxes_report.json").read_text())
    assert report["slices"][4]["objects"]["label_3"]["source"] == "box prompt"
    assert report["slices"][9]["objects"]["label_4"]["source"] == "points prompt"


def _bad_inputs(d: Path, image):
    write_volume(image.with_array(image.array), d / "q.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(d / "flat.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 8, 8), np.float32), isVector=False), str(d / "t4d.nii.gz"))
    shifted = sitk.GetImageFromArray(np.zeros(image.array.shape, np.uint8))
    shifted.SetSpacing(image.spacing)
    sitk.WriteImage(shifted, str(d / "othergrid.nii.gz"))
    empty = image.to_sitk() * 0
    sitk.WriteImage(sitk.Cast(empty, sitk.sitkUInt8), str(d / "empty.nii.gz"))
    one = np.zeros(image.array.shape, np.uint8)
    one[5, 10:20, 10:20] = 1
    write_labels(read_labels_like(image, one), d / "one.nii.gz")
    (d / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    (d / "a_file").write_text("x")
    q, p = ["--query", d / "q.nii.gz"], ["--prompt-labels", d / "one.nii.gz"]
    out = ["--out", d / "res.nii.gz"]
    return {
        "missing file": (["--query", d / "missing.nii.gz", *p, *out, *RANDOM], "does not exist"),
        "2D image": (["--query", d / "flat.nii.gz", *p, *out, *RANDOM], "2D"),
        "4D image": (["--query", d / "t4d.nii.gz", *p, *out, *RANDOM], "4D"),
        "other grid": ([*q, "--prompt-labels", d / "othergrid.nii.gz", *out, *RANDOM], "different grids"),
        "empty prompt": ([*q, "--prompt-labels", d / "empty.nii.gz", *out, *RANDOM], "no labelled voxel"),
        "missing label value": ([*q, *p, "--labels", "7", *out, *RANDOM], "label value 7 does not exist"),
        "unknown model": ([*q, *p, *out, "--model", "sam9-huge", "--device", "cpu"], "unknown model"),
        "corrupt checkpoint": ([*q, *p, *out, "--checkpoint", d / "corrupt.pt", "--device", "cpu"], "checkpoint"),
        "unwritable output": ([*q, *p, "--out", d / "a_file" / "res.nii.gz", *RANDOM], "cannot write"),
    }


def read_labels_like(image, arr):
    from SAM2FewShotLib.io.volume import LabelMap, default_segments

    return LabelMap(image.with_array(arr), default_segments([1]))


def test_bad_input_is_one_line_nonzero_and_leaves_no_file(tmp_path, capsys):
    image, _ = phantom()
    cases = _bad_inputs(tmp_path, image)
    before = set(tmp_path.rglob("*"))
    for name, (argv, expected) in cases.items():
        code, err = run_cli(["segment", *argv], capsys)
        assert code == 2, name
        assert err.startswith("sam2fewshot: error:") and "\n" not in err, (name, err)
        assert expected.lower() in err.lower(), (name, err)
        assert set(tmp_path.rglob("*")) == before, f"{name} left files behind"


def test_a_real_subprocess_exits_nonzero_with_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", SAM2FEWSHOT_CACHE=str(tmp_path / "cache"))
    image, labels = phantom()
    write_volume(image, tmp_path / "q.nii.gz")
    write_labels(labels, tmp_path / "l.nii.gz")
    r = subprocess.run([sys.executable, "-m", "SAM2FewShotLib.cli", "segment", "--query", str(tmp_path / "q.nii.gz"),
                        "--prompt-labels", str(tmp_path / "l.nii.gz"), "--out", str(tmp_path / "o.nii.gz"),
                        "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "sam2fewshot: error: weights for sam2.1-tiny are not in the cache and cannot be downloaded (offline): "
        "use --checkpoint FILE or sam2fewshot models import sam2.1-tiny FILE"]
    assert not (tmp_path / "o.nii.gz").exists()


def test_checkpoint_file_runs_like_the_registered_model(case, capsys):
    d, image, _ = case
    predictor = build_video_predictor(TEST_CONFIG, image_size=TEST_IMAGE_SIZE, seed=11)
    torch.save({"model": predictor.state_dict()}, d / "weights.pt")
    code, err = run_cli(["segment", "--query", d / "query.nrrd", "--prompt-labels", d / "prompt.seg.nrrd",
                         "--out", d / "ck.nii.gz", "--checkpoint", d / "weights.pt", "--config", TEST_CONFIG,
                         "--image-size", TEST_IMAGE_SIZE, "--device", "cpu", "-q"], capsys)
    assert code == 0, err
    report = json.loads((d / "ck_report.json").read_text())
    assert report["model"]["weights"] == str(d / "weights.pt")


IN_OPEN, IN_ACCESS = 0x20, 0x01


def _inotify(path: Path):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    if fd < 0 or libc.inotify_add_watch(fd, str(path).encode(), IN_OPEN | IN_ACCESS) < 0:
        pytest.skip("inotify is not available")
    return fd


def _events(fd) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")
def test_fewshot_never_opens_the_query_label_file(tmp_path):
    """The kernel tells whether any process opened the file: no mock of I/O can hide it."""
    image, labels = phantom(seed=1)
    support_image, support_labels = phantom(seed=2)
    write_volume(image, tmp_path / "case_img.nii.gz")
    write_labels(labels, tmp_path / "case_label.nii.gz")  # the query's ground truth, right beside it
    write_volume(support_image, tmp_path / "support_img.nii.gz")
    write_labels(support_labels, tmp_path / "support_label.nii.gz")
    fd = _inotify(tmp_path / "case_label.nii.gz")
    try:
        r = subprocess.run([sys.executable, "-m", "SAM2FewShotLib.cli", "segment",
                            "--query", str(tmp_path / "case_img.nii.gz"),
                            "--support", str(tmp_path / "support_img.nii.gz"), str(tmp_path / "support_label.nii.gz"),
                            "--out", str(tmp_path / "result.nii.gz"), "--scheme", "video", "--features", "intensity",
                            "--augmentations", "1", "--slices-per-structure", "2", "--image-size", "128",
                            "--random-weights", "--device", "cpu", "-q"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert _events(fd) == b"", "the query's label file was opened during segmentation"
        read_labels(tmp_path / "case_label.nii.gz")  # positive control: the watch does see an open
        assert _events(fd) != b""
    finally:
        os.close(fd)
    assert read_labels(tmp_path / "result.nii.gz").volume.same_grid(image)


def test_demo_runs_the_main_job_on_example_data(shared_data, tmp_path, capsys):
    code, err = run_cli(["demo", "--data", shared_data / "msd_hippocampus", "--out", tmp_path,
                         "--scheme", "video", "--random-weights", "--image-size", "128", "--device", "cpu", "-q"],
                        capsys)
    assert code == 0, err
    reports = list(tmp_path.glob("*_report.json"))
    assert len(reports) == 1
    demo = json.loads(reports[0].read_text())["demo"]
    assert demo["query"] == "hippocampus_015" and demo["support"] == "hippocampus_184"
    assert set(demo["dice"]) == {"anterior hippocampus", "posterior hippocampus"}
    assert all(0 <= v <= 1 for v in demo["dice"].values())
