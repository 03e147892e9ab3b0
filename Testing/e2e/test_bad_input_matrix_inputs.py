"""Inputs that are not what they claim, as a matrix through the real `sam2fewshot segment` (issue 26, item 5).

A header naming its data elsewhere (NRRD ``data file``, MetaImage ``ElementDataFile``, in their single,
LIST and pattern forms) must name a regular file beside it; a DICOM series is chosen by ``--series``
(unknown UIDs refused, listed). Each refused case: exit code 2, exactly one line starting with
"sam2fewshot: error:", the expected words in it, every file as it was. A DICOM series with a missing
slice is handled by a stated rule: read onto a regular grid, said in one line, kept in the report.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from matrix_inputs import METHODS, RANDOM, SHAPE, _argv, _cli, _inputs, _options
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.io.volume import Volume
from SAM2FewShotLib.io.volume_io import read_labels, read_volume

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))
from test_bad_input_matrix import (  # noqa: E402 - its check, under a name pytest does not collect again
    test_refused_in_one_line_with_nothing_left_and_inputs_unchanged as refused_in_one_line,
)

from io_cases import write_dicom_series  # noqa: E402

OUTSIDE = "lies outside the header's folder"
NRRD_HEAD = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
             f"sizes: {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\nspace directions: (1,0,0) (0,1,0) (0,0,3)\n"
             "space origin: (0,0,0)\nencoding: raw\nendian: little\n")
META_HEAD = (f"ObjectType = Image\nNDims = 3\nDimSize = {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\n"
             "ElementSpacing = 1 1 3\nElementType = MET_FLOAT\nBinaryData = True\n")
SLICES = [f"../slice{k:02d}.raw" for k in range(SHAPE[0])]
# header file -> its data file field: each names a file outside hdr/, or one that is not a regular file
HEADERS = {
    "up.nhdr": "data file: ../outside.raw",
    "datafile.nhdr": "datafile: ../outside.raw",
    "absolute.nhdr": "data file: /etc/passwd",
    "proc.nhdr": "data file: /proc/self/environ",
    "device.nhdr": "data file: /dev/zero",
    "link.nhdr": "data file: link.raw",
    "fifo.nhdr": "data file: pipe.raw",
    "folder.nhdr": "data file: sub",
    "missing.nhdr": "data file: nothere.raw",
    "list.nhdr": "data file: LIST 2\n" + "\n".join(SLICES),
    "pattern.nhdr": "data file: ../slice%02d.raw 0 7 1 2",
    "attached.nrrd": "data file: ../outside.raw",
    "up.mhd": "ElementDataFile = ../outside.raw",
    "list.mhd": "ElementDataFile = LIST 2D\n" + "\n".join(SLICES),
    "pattern.mhd": "ElementDataFile = ../slice%02d.raw 0 7 1",
    "absolute.mha": "ElementDataFile = /etc/passwd",
}
WORDS = {"device.nhdr": "/dev/zero", "fifo.nhdr": "not a regular file", "folder.nhdr": "not a regular file",
         "missing.nhdr": "does not exist"}  # /dev/zero: "not a regular file" (run/input_files) or "lies outside"
SERIES = "1.2.826.0.1.3680043.2.1125.26.1"
LOCALIZER = "1.2.826.0.1.3680043.2.1125.26.2"


@pytest.fixture(scope="module")
def inputs(world: Path) -> Path:
    """The matrix's world plus hdr/ (bad headers, and the data they would read: real voxels, so only the
    check stands between them and a segmentation), a DICOM folder of two series and one with a gap."""
    data = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    (world / "outside.raw").write_bytes(data.tobytes())
    for k in range(SHAPE[0]):
        (world / f"slice{k:02d}.raw").write_bytes(data[k].tobytes())
    hdr = world / "hdr"
    (hdr / "sub").mkdir(parents=True)
    os.symlink(world / "outside.raw", hdr / "link.raw")
    os.mkfifo(hdr / "pipe.raw")
    for name, field in HEADERS.items():
        head = NRRD_HEAD if name.endswith((".nhdr", ".nrrd")) else META_HEAD
        (hdr / name).write_text(head + field + "\n")
    image = read_volume(world / "q.nrrd")
    ct = Volume(np.round(image.array * 1000).astype(np.int16), image.spacing, image.origin, image.direction)
    write_dicom_series(ct, world / "dicom", SERIES)
    write_dicom_series(Volume(ct.array[:2], ct.spacing, ct.origin), world / "dicom", LOCALIZER)
    write_dicom_series(ct, world / "gap", SERIES)
    (world / "gap" / f"{SERIES}_003.dcm").unlink()
    return world


QUERY_CASES = [(f"query header {name}", lambda d, n=name: {"--query": [str(d / "hdr" / n)]},
                WORDS.get(name, OUTSIDE)) for name in HEADERS] + [
    ("--series of a file", lambda d: {"--series": [SERIES]}, "is a file, not a DICOM folder"),
    ("--series unknown", lambda d: {"--query": [str(d / "dicom")], "--series": ["7.7.7"]}, "(8 files)"),
]
PROMPT_CASES = [
    ("prompt labels header outside", lambda d: {"--prompt-labels": [str(d / "hdr" / "up.nhdr")]}, OUTSIDE),
    ("prompt labels data is a fifo", lambda d: {"--prompt-labels": [str(d / "hdr" / "fifo.nhdr")]},
     "not a regular file"),
]
SUPPORT_CASES = [
    ("support image header outside", lambda d: {"--support": [str(d / "hdr" / "up.mhd"), str(d / "s_label.nii.gz")]},
     OUTSIDE),
    ("support labels header outside", lambda d: {"--support": [str(d / "s.nrrd"), str(d / "hdr" / "list.nhdr")]},
     OUTSIDE),
]


def _cases():
    for method in METHODS:
        specific = PROMPT_CASES if method == "propagate" else [] if method == "retrieval" else SUPPORT_CASES
        for name, build, words in QUERY_CASES + specific:
            yield pytest.param(method, build, words, id=f"{method}: {name}")


@pytest.mark.parametrize("method, build, words", list(_cases()))
def test_refused_in_one_line_with_nothing_left_and_inputs_unchanged(inputs, method, build, words, capfd):
    refused_in_one_line(inputs, method, build, words, capfd)  # the maintained matrix's own check


def test_the_unknown_series_line_lists_every_series_with_its_file_count(inputs, capfd):
    assert main(["segment", *_argv({**_options("registration", inputs), "--query": [str(inputs / "dicom")],
                                    "--series": ["7.7.7"]})]) == 2
    line = capfd.readouterr().err.strip()
    assert "7.7.7 is not a series" in line and "(8 files)" in line and "(2 files)" in line


def test_headers_whose_data_lie_beside_them_are_read(inputs, tmp_path):
    """The forms the check understands, used as intended, still read: one file, LIST, pattern."""
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "all.raw").write_bytes(data.tobytes())
    for k in range(SHAPE[0]):
        (tmp_path / "data" / f"s{k}.raw").write_bytes(data[k].tobytes())
    fields = {"one.nhdr": "data file: data/all.raw",
              "list.nhdr": "data file: LIST 2\n" + "\n".join(f"data/s{k}.raw" for k in range(SHAPE[0])),
              "pattern.nhdr": "data file: data/s%d.raw 0 7 1 2", "one.mhd": "ElementDataFile = data/all.raw",
              "pattern.mhd": "ElementDataFile = data/s%d.raw 0 7 1"}
    for name, field in fields.items():
        (tmp_path / name).write_text((NRRD_HEAD if name.endswith(".nhdr") else META_HEAD) + field + "\n")
        assert np.array_equal(read_volume(tmp_path / name).array, data), name


def test_a_dicom_series_with_a_missing_slice_is_read_on_a_regular_grid_said_and_reported(inputs, tmp_path):
    out = tmp_path / "o.nii.gz"
    argv = [*_inputs("registration", inputs, query="gap"), "--out", out, *RANDOM, "-q"]
    run = _cli(argv)
    assert run.wait(timeout=300) == 0, run.stderr.read()
    lines = run.stderr.read().strip().splitlines()
    said = [line for line in lines if "regular grid" in line]
    assert len(said) == 1 and "missing or unevenly spaced slices" in said[0] and "7 slices" in said[0], lines
    [note] = json.loads((tmp_path / "o_report.json").read_text())["input_notes"]
    assert note["dicom_series"] == SERIES and (note["acquired_slices"], note["slices"]) == (7, 7)
    assert note["spacing_mm"] == pytest.approx(3.0 * 7 / 6)
    labels = read_labels(out).volume
    assert labels.array.shape[0] == 7 and labels.spacing[2] == pytest.approx(3.0 * 7 / 6)
