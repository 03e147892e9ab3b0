"""Outputs that cannot be tricked, and inputs refused with their real reason: a matrix for `sam2fewshot segment`.

Issue 26, items 2, 6 and 7: an output must not replace any file of an input (a label file's
names-and-colours sidecar, a library's list file or index, a DICOM folder's files, a detached
header's data file), whether named directly or through a symlink or a hard link; a name too long for
the file system, a path that is not UTF-8, a FIFO or a device, a file that may not be read, labels on
a grid turned another way or holding NaN, and a cache folder that is not one are each refused before
any work. Each refused case: exit code 2, exactly one line "sam2fewshot: error: ...", its words,
nothing left behind or changed (matrix_inputs._snapshot). Real files, the real CLI in process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from permissions import SKIP_REASON, permissions_enforced

from matrix_inputs import METHODS, _argv, _options, _snapshot
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.common.cache import CACHE_ENV
from SAM2FewShotLib.io.volume_io import read_labels, read_volume, write_volume

QUICK = {"--random-weights": [], "--image-size": ["128"], "--device": ["cpu"], "-q": []}
SUPPORT_METHODS = ("matched-support", "registration", "guided")
BAD = "\udcff"  # a byte that is not UTF-8, as Python hands it over from a Linux command line


@pytest.fixture(scope="module")
def extra(world):
    """The matrix's world plus what these cases need: links, a DICOM folder, a detached header, FIFOs,
    names that are not UTF-8, labels turned another way and labels holding NaN."""
    d = world
    (d / "lib" / ".sam2fewshot_index").mkdir(exist_ok=True)
    os.symlink(d / "q.nrrd", d / "link_to_q.nrrd")
    os.symlink(d / "s_label.json", d / "link_to_sidecar.json")
    os.link(d / "q.nrrd", d / "hard_q.nrrd")
    os.link(d / "s_label.json", d / "hard_sidecar.json")
    (d / "dicom").mkdir()
    (d / "dicom" / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM")  # outputs are checked before it is read
    (d / "hdr.nhdr").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 32 32 8\nencoding: raw\n"
                                "endian: little\ndata file: hdr.raw\n")
    (d / "hdr.raw").write_bytes(np.zeros((8, 32, 32), "<f4").tobytes())
    for name in ("fifo.nrrd", "fifo_labels.nii.gz", "fifo_prompts.json"):
        os.mkfifo(d / name)
    shutil.copy(d / "q.nrrd", d / f"q{BAD}.nrrd")
    shutil.copy(d / "s.nrrd", d / f"s{BAD}.nrrd")
    shutil.copy(d / "p.nii.gz", d / f"p{BAD}.nii.gz")
    for labels, turned in (("p.nii.gz", "p_turned.nii.gz"), ("s_label.nii.gz", "s_turned.nii.gz")):
        img = sitk.ReadImage(str(d / labels))
        img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, -1))  # same shape, spacing and origin: only the direction differs
        sitk.WriteImage(img, str(d / turned))
    image = read_volume(d / "q.nrrd")
    nan = np.zeros(image.array.shape, np.float32)
    nan[4, 10:20, 10:20], nan[4, 0, 0] = 1.0, np.nan
    write_volume(image.with_array(nan), d / "nan_labels.nrrd")
    return d


def _out(name: str) -> callable:
    return lambda d: {"--out": [str(d / name)]}


def _report(name: str) -> callable:
    return lambda d: {"--report": [str(d / name)]}


# (name, expected words in the one line, builder of the options it changes)
OUTPUT_CASES = [
    ("output is a symlink to the query", "also an input of this run (the query)", _out("link_to_q.nrrd")),
    ("output is a hard link of the query", "also an input of this run (the query)", _out("hard_q.nrrd")),
    ("report is the query", "also an input of this run (the query)", _report("q.nrrd")),
    ("report is a symlink to the query", "also an input of this run (the query)", _report("link_to_q.nrrd")),
    ("output name over 255 bytes", "bytes its file system allows", _out("a" * 250 + ".nii.gz")),
    ("report name from --out over 255 bytes", "the report", _out("b" * 245 + ".nii.gz")),
    ("report name over 255 bytes", "bytes its file system allows", _report("c" * 260 + ".json")),
    ("sidecar name over 255 bytes", "names-and-colours sidecar", _out("d" * 251 + ".mha")),
    ("output name not UTF-8", "not valid UTF-8", _out(f"o{BAD}.nii.gz")),
    ("report name not UTF-8", "not valid UTF-8", _report(f"r{BAD}.json")),
    ("query is a FIFO", "not a regular file but a FIFO", lambda d: {"--query": [str(d / "fifo.nrrd")]}),
    ("query is a device", "not a regular file but a character device", lambda d: {"--query": [os.devnull]}),
    ("query name not UTF-8", "not valid UTF-8", lambda d: {"--query": [str(d / f"q{BAD}.nrrd")]}),
    ("report replaces a file of the DICOM query", "would replace a file of the DICOM folder",
     lambda d: {"--query": [str(d / "dicom")], "--report": [str(d / "dicom" / "IM0001.dcm")]}),
    ("report replaces the data file of a detached header", "would replace the data file of the query",
     lambda d: {"--query": [str(d / "hdr.nhdr")], "--report": [str(d / "hdr.raw")]}),
]
PROPAGATE_CASES = [
    ("output shares the prompt labels' sidecar", "would replace the names-and-colours sidecar of the prompt labels",
     _out("p.mha")),
    ("report is the prompt labels' sidecar", "would replace the names-and-colours sidecar of the prompt labels",
     _report("p.json")),
    ("report is the prompts file", "also an input of this run (the prompts file)",
     lambda d: {"--prompts": [str(d / "prompts.json")], "--report": [str(d / "prompts.json")]}),
    ("prompt labels are a FIFO", "not a regular file", lambda d: {"--prompt-labels": [str(d / "fifo_labels.nii.gz")]}),
    ("prompts file is a FIFO", "not a regular file", lambda d: {"--prompts": [str(d / "fifo_prompts.json")]}),
    ("prompt labels name not UTF-8", "not valid UTF-8", lambda d: {"--prompt-labels": [str(d / f"p{BAD}.nii.gz")]}),
    ("prompt labels turned another way", "different grids: direction",
     lambda d: {"--prompt-labels": [str(d / "p_turned.nii.gz")]}),
    ("prompt labels holding NaN", "found NaN values", lambda d: {"--prompt-labels": [str(d / "nan_labels.nrrd")]}),
]
SUPPORT_CASES = [
    ("output shares the support labels' sidecar", "would replace the names-and-colours sidecar of the support labels",
     _out("s_label.nrrd")),
    ("report is the support labels' sidecar", "would replace the names-and-colours sidecar of the support labels",
     _report("s_label.json")),
    ("report is a symlink to the support labels' sidecar", "names-and-colours sidecar of the support labels",
     _report("link_to_sidecar.json")),
    ("report is a hard link of the support labels' sidecar", "names-and-colours sidecar of the support labels",
     _report("hard_sidecar.json")),
    ("output is the support image", "also an input of this run (the support image)", _out("s.nrrd")),
    ("support labels are a FIFO", "not a regular file",
     lambda d: {"--support": [str(d / "s.nrrd"), str(d / "fifo_labels.nii.gz")]}),
    ("support image name not UTF-8", "not valid UTF-8",
     lambda d: {"--support": [str(d / f"s{BAD}.nrrd"), str(d / "s_label.nii.gz")]}),
    ("support labels turned another way", "different grids: direction",
     lambda d: {"--support": [str(d / "s.nrrd"), str(d / "s_turned.nii.gz")]}),
    ("support labels holding NaN", "found NaN values",
     lambda d: {"--support": [str(d / "s.nrrd"), str(d / "nan_labels.nrrd")]}),
]
LIBRARY_CASES = [
    ("report is the library's list file", "would replace the list file of the library", _report("lib/library.json")),
    ("output inside the library's index", "would replace the embedding index of the library",
     _out("lib/.sam2fewshot_index/o.nii.gz")),
    ("report is a library case's sidecar", "names-and-colours sidecar of a label file of the library",
     _report("s_label.json")),
    ("output is a library case's image", "would replace an image of the library", _out("s.nrrd")),
]


def _cases():
    for method in METHODS:
        specific = PROPAGATE_CASES if method == "propagate" else \
            SUPPORT_CASES if method in SUPPORT_METHODS else LIBRARY_CASES
        for name, words, build in OUTPUT_CASES + specific:
            yield pytest.param(method, build, words, id=f"{method}: {name}")


CASES = list(_cases())


def _refused(argv: list[str], words: str | list[str], capfd, world: Path) -> None:
    """The command exits 2 with one line holding ``words``, and leaves ``world`` as it found it."""
    before = _snapshot(world)
    code = main(argv)
    err = capfd.readouterr().err
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sam2fewshot: error:"), lines
    assert all(w.lower() in lines[0].lower() for w in ([words] if isinstance(words, str) else words)), lines[0]
    assert _snapshot(world) == before, "a refused run changed or left files"


@pytest.mark.parametrize("method, build, words", CASES)
def test_refused_in_one_line_with_the_real_reason_and_nothing_replaced(extra, method, build, words, capfd):
    _refused(["segment", *_argv({**QUICK, **_options(method, extra), **build(extra)})], words, capfd, extra)


# --- the cache folder ----------------------------------------------------------------------------------

CACHE_COMMANDS = [
    *[pytest.param(lambda d, m=m: ["segment", *_argv({**QUICK, **_options(m, d)})], id=f"segment {m}")
      for m in METHODS if m != "registration"],  # registration loads no model and needs no cache
    pytest.param(lambda d: ["library", "build", str(d / "lib"), "--random-weights", "--image-size", "128",
                            "--device", "cpu", "-q"], id="library build"),
    pytest.param(lambda d: ["models", "import", "sam2.1-tiny", str(d / "corrupt.pt")], id="models import"),
    pytest.param(lambda d: ["models", "download", "sam2.1-tiny", "--offline"], id="models download"),
    pytest.param(lambda d: ["demo", "--method", "registration", "--out", str(d / "demo_out")], id="demo"),
]


@pytest.mark.parametrize("under", [False, True], ids=["cache is a file", "cache under a file"])
@pytest.mark.parametrize("command", CACHE_COMMANDS)
def test_a_cache_that_is_not_a_folder_is_one_line_naming_the_setting(extra, command, under, capfd, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(extra / "a_file" / "sub" if under else extra / "a_file"))
    reason = "cannot be made: " if under else "is not a folder: "
    _refused(command(extra), [f"{CACHE_ENV}=", reason, "point it to a folder you can write"], capfd, extra)


# --- permissions: meaningless for root, who may read anything ------------------------------------------

ROOT = not permissions_enforced()  # root, normally: the skipped tests say so


@pytest.mark.skipif(ROOT, reason=SKIP_REASON)
@pytest.mark.parametrize("target", ["file", "folder", "cache"])
def test_permission_denied_is_said_as_such(extra, tmp_path, target, capfd, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    query = locked / "q.nrrd"
    shutil.copy(extra / "q.nrrd", query)
    options = {**QUICK, **_options("matched-support", extra), "--out": [str(tmp_path / "o.nii.gz")]}
    if target == "cache":
        monkeypatch.setenv(CACHE_ENV, str(locked))
        locked.chmod(0o500)
        words = "is not writable"
    else:
        options["--query"] = [str(query)]
        (query if target == "file" else locked).chmod(0o000)
        words = "permission denied"
    try:
        _refused(["segment", *_argv(options)], words, capfd, extra)
        assert not (tmp_path / "o.nii.gz").exists()
    finally:
        locked.chmod(0o700)
        query.chmod(0o600)


# --- handled by a stated rule --------------------------------------------------------------------------


def _elsewhere(tmp_path: Path) -> Path:
    """A folder on another file system than ``tmp_path`` when this machine has one (/dev/shm), else beside."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        folder = Path(shm / f"sam2fewshot-test-{os.getpid()}-{tmp_path.name}")
    else:
        folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def test_a_symlinked_output_lands_whole_beside_its_target(world, tmp_path, capfd):
    """An --out that is a symlink into another folder (another file system where there is one): the labels
    and their sidecar both land beside the link's target, written there through temporaries made there;
    the link stays a link, and reading it finds the names."""
    target_folder = _elsewhere(tmp_path)
    try:
        link = tmp_path / "result.nii.gz"
        link.symlink_to(target_folder / "real.nii.gz")
        options = {**QUICK, **_options("registration", world), "--out": [str(link)]}
        assert main(["segment", *_argv(options)]) == 0, capfd.readouterr().err
        assert link.is_symlink() and sorted(p.name for p in target_folder.iterdir()) == ["real.json", "real.nii.gz"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["result.nii.gz", "result_report.json"]
        assert "real.json" in capfd.readouterr().out  # the message names where the sidecar went
        assert [s.name for s in read_labels(link).segments] == [s.name for s in read_labels(world / "s_label.nii.gz")
                                                                .segments]
    finally:
        shutil.rmtree(target_folder, ignore_errors=True)


def test_a_long_valid_name_is_written_and_leaves_no_temporary(world, tmp_path, capfd):
    """A name near the limit works: its temporary is named after a digest, never past the limit."""
    out = tmp_path / ("n" * 240 + ".nii.gz")  # 247 bytes; the report's 252
    options = {**QUICK, **_options("registration", world), "--out": [str(out)]}
    assert main(["segment", *_argv(options)]) == 0, capfd.readouterr().err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([out.name, "n" * 240 + ".json", "n" * 240 + "_report.json"])
