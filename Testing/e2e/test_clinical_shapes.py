"""Volumes as clinics have them (issue 13): the shape and header tests, through the real CLI.

This module: 4D series and vector/colour images, and header and label oddities. A 4D query (cine,
DWI, multi-echo) or a vector one is segmented frame by frame or component by component when the
user names one (--frame N, --component N); without it, one line naming the option and how many
there are, never a silent pick. Oddities: NaN/Inf voxels in a query or a support (handled, the
report's input_notes says so), a negative spacing (read as a flipped axis, the result on the grid
as read), a support image with zero spacing or a skewed direction (refused in one line naming the
file), a support label value above 255 (read as uint16, named, coloured, segmented), supports that
label different structures, and a structure a support lists but never labels. What
test_bad_input_matrix.py checks for every method (a constant query, zero spacing or a skewed
direction in the query, label values over 65535, empty label maps) is not repeated here.
test_clinical_shapes_methods.py runs every method on a thin stack and on supports stored in
another plane. Real files, the real CLI, the real SAM2 architecture with random weights at 128 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from phantoms import phantom
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume_io import (
    read_labels,
    read_volume,
    write_labels,
    write_volume,
)
from SAM2FewShotLib.run import protocol

# one thread: runs compare bit for bit
RANDOM = ["--random-weights", "--image-size", "128", "--device", "cpu", "--threads", "1"]
SHAPE = (8, 32, 32)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A 3-frame 4D file whose frames differ, its frame 1 as a 3D file, a colour twin, and prompts."""
    d = tmp_path_factory.mktemp("series")
    image, truth = phantom(SHAPE, spacing=(1.2, 1.2, 8.0))  # a thick-slice stack, like cine MRI
    frames = [image.array.astype(np.float32) + 40.0 * t for t in range(3)]
    four_d = sitk.JoinSeries([_as_sitk(f, image) for f in frames])
    sitk.WriteImage(four_d, str(d / "cine.nii.gz"))
    sitk.WriteImage(_as_sitk(frames[1], image), str(d / "frame1.nii.gz"))
    colour = np.stack([frames[0], frames[1], frames[2]], axis=-1)
    rgb = sitk.GetImageFromArray(colour, isVector=True)
    rgb.CopyInformation(_as_sitk(frames[0], image))
    sitk.WriteImage(rgb, str(d / "colour.nrrd"))
    prompt = np.zeros_like(truth.volume.array)
    prompt[4] = truth.volume.array[4]
    write_labels(truth.with_array(prompt), d / "prompt.nii.gz")
    return {"dir": d, "image": image, "frames": frames}


def _as_sitk(array: np.ndarray, like) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(like.spacing)
    img.SetOrigin(like.origin)
    img.SetDirection(tuple(np.asarray(like.direction_matrix).ravel()))
    return img


def test_a_4d_series_is_refused_without_a_frame_in_one_line_naming_the_option(series, capsys):
    d = series["dir"]
    code = main(["segment", "--query", str(d / "cine.nii.gz"), "--prompt-labels", str(d / "prompt.nii.gz"),
                 "--out", str(d / "never.nii.gz"), *RANDOM])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "4D series of 3 frames" in line and "--frame N (0 to 2)" in line
    assert not (d / "never.nii.gz").exists()
    with pytest.raises(InputError, match="outside the 3 frames"):
        read_volume(d / "cine.nii.gz", frame=3)
    with pytest.raises(InputError, match="has one frame"):
        read_volume(d / "frame1.nii.gz", frame=2)


def test_the_chosen_frame_is_segmented_on_its_own_3d_grid(series, capsys, tmp_path):
    d = series["dir"]
    volume = read_volume(d / "cine.nii.gz", frame=1)
    assert volume.same_grid(series["image"]) and np.array_equal(volume.array, series["frames"][1])
    outs = {}
    for name, query, extra in (("4d", "cine.nii.gz", ["--frame", "1"]), ("3d", "frame1.nii.gz", [])):
        outs[name] = tmp_path / f"{name}.nii.gz"
        assert main(["segment", "--query", str(d / query), "--prompt-labels", str(d / "prompt.nii.gz"),
                     "--out", str(outs[name]), *extra, *RANDOM]) == 0, capsys.readouterr().err
    four, three = read_labels(outs["4d"]), read_labels(outs["3d"])
    assert four.volume.same_grid(series["image"])
    assert np.array_equal(four.volume.array, three.volume.array)  # frame 1 of the series = the 3D file


def test_a_vector_image_needs_a_component(series, capsys):
    d = series["dir"]
    with pytest.raises(InputError, match=r"3 components per voxel .*--component N \(0 to 2\)"):
        read_volume(d / "colour.nrrd")
    chosen = read_volume(d / "colour.nrrd", component=2)
    assert np.array_equal(chosen.array, series["frames"][2]) and chosen.same_grid(series["image"])
    with pytest.raises(InputError, match="has one component"):
        read_volume(d / "frame1.nii.gz", component=1)


def test_the_worker_protocol_carries_the_frame_and_component(series):
    job = protocol.parse_request(protocol.encode({
        "type": "job", "id": "j", "method": "propagate", "query": "q.nii.gz", "out": "o.nii.gz",
        "report": "o.json", "prompt_labels": "p.nii.gz", "frames": {"frame": 2, "component": None}}))
    assert job.frames.frame == 2 and job.frames.component is None
    with pytest.raises(protocol.ProtocolError, match="frames.frame must be a whole number from 0"):
        protocol.parse_request(protocol.encode({"type": "job", "id": "j", "method": "propagate", "query": "q",
                                                "out": "o.nii.gz", "report": "o.json", "frames": {"frame": -1}}))


# --- header and label oddities ------------------------------------------------------------------------

MODEL_METHODS = ("matched-support", "retrieval", "guided")
SUPPORT_METHODS = ("matched-support", "registration", "guided")
FAST = ["--augmentations", "1", "--slices-per-structure", "2"]


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A query, two supports, a library, and an odd twin of each."""
    d = tmp_path_factory.mktemp("odd")
    image, _ = phantom(SHAPE, spacing=(1.0, 1.0, 3.0))
    write_volume(image, d / "q.nrrd")
    nan = image.array.copy()
    nan[2, 3, 4], nan[3, 5, 5], nan[5, 1, 1] = np.nan, np.inf, -np.inf
    write_volume(image.with_array(nan), d / "q_nan.nrrd")
    for n in (1, 2):
        support, labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=n)
        write_volume(support, d / f"s{n}.nrrd")
        write_labels(labels, d / f"s{n}_label.nii.gz")
    support, labels = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=1)
    array = labels.volume.array
    write_volume(support.with_array(np.where(array == 1, np.nan, support.array)), d / "s1_nan.nrrd")
    label300 = array.astype(np.uint16)
    label300[label300 == 2] = 300
    sitk.WriteImage(_as_sitk(label300, support), str(d / "s1_label300.nii.gz"))  # no sidecar: values only
    _, other = phantom(SHAPE, spacing=(1.0, 1.0, 3.0), seed=2)
    only1 = np.where(other.volume.array == 2, 0, other.volume.array).astype(np.uint8)
    write_labels(other.with_array(only1, segments=other.segments[:1]), d / "s2_only1_label.nii.gz")
    write_labels(labels.with_array(np.where(array == 2, 0, array).astype(np.uint8)), d / "s1_unlabelled2.nii.gz")
    assert {s.name for s in read_labels(d / "s1_unlabelled2.nii.gz").segments} == {"structure_1", "structure_2"}
    _raw(d / "s_zerospacing.nhdr", support, "(1,0,0) (0,0,0) (0,0,3)")
    _raw(d / "s_skewed.nhdr", support, "(1,0,0) (1,1,0) (0,0,3)")
    _raw(d / "q_negative.mha", image, None)
    (d / "lib").mkdir()
    (d / "lib" / "library.json").write_text(json.dumps({"cases": [{"image": str(d / "s1.nrrd"),
                                                                   "labels": str(d / "s1_label.nii.gz")}]}))
    return d


def _raw(path: Path, volume, directions) -> None:
    """A header written by hand: NRRD space directions, or a MetaImage with a negative spacing (which
    no writer produces, but scanners' converters do)."""
    data = path.with_suffix(".raw")
    k, j, i = volume.array.shape
    data.write_bytes(volume.array.astype(np.float32).tobytes())
    if directions is None:
        path.write_text(f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                        f"Offset = 10 20 30\nElementSpacing = 1 -1 3\nDimSize = {i} {j} {k}\n"
                        f"ElementType = MET_FLOAT\nElementDataFile = {data.name}\n")
        return
    path.write_text(f"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: {i} {j} {k}\n"
                    f"space directions: {directions}\nspace origin: (0,0,0)\nencoding: raw\nendian: little\n"
                    f"data file: {data.name}\n")


def _segment(d: Path, method: str, out: Path, query: str = "q.nrrd", supports=(("s1.nrrd", "s1_label.nii.gz"),),
             extra=()) -> int:
    """The CLI on ``query``, conditioned as ``method`` is: by the supports, or by the library."""
    if method == "retrieval":
        condition = ["--library", str(d / "lib")]
    else:
        condition = [a for image, labels in supports for a in ("--support", str(d / image), str(d / labels))]
        condition += ["--method", method, *(FAST if method != "registration" else [])]
    return main(["segment", "--query", str(d / query), *condition, "--out", str(out), *extra, *RANDOM, "-q"])


def _report(out: Path) -> dict:
    return json.loads(out.with_name(out.name.split(".")[0] + "_report.json").read_text())


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_nan_and_infinite_voxels_in_a_query_or_support_are_handled_and_noted(odd, tmp_path, method, capfd):
    supports = (("s1_nan.nrrd", "s1_label.nii.gz"),)
    out = tmp_path / "o.nii.gz"
    assert _segment(odd, method, out, query="q_nan.nrrd", supports=supports) == 0
    err = capfd.readouterr().err.strip().splitlines()
    notes = {Path(n["file"].split()[-1]).name: n for n in _report(out)["input_notes"]}
    assert notes["q_nan.nrrd"]["non_finite_voxels"] == 3 and "lowest finite value" in notes["q_nan.nrrd"]["rule"]
    expected = {"q_nan.nrrd"} | ({"s1_nan.nrrd"} if method != "retrieval" else set())
    assert set(notes) == expected and all(any(name in line for line in err) for name in expected)
    assert read_labels(out).volume.same_grid(read_volume(odd / "q_nan.nrrd"))


@pytest.mark.parametrize("method", ["registration", "matched-support"])
def test_a_negative_spacing_is_read_as_a_flipped_axis_and_the_result_kept_on_that_grid(odd, tmp_path, method):
    query = read_volume(odd / "q_negative.mha")
    assert query.spacing == (1.0, 1.0, 3.0) and np.allclose(query.direction_matrix, np.diag([1.0, -1.0, 1.0]))
    out = tmp_path / "o.nii.gz"
    assert _segment(odd, method, out, query="q_negative.mha") == 0
    result = sitk.ReadImage(str(out))
    assert read_labels(out).volume.same_grid(query)
    assert np.allclose(result.TransformIndexToPhysicalPoint((2, 5, 1)), (12.0, 15.0, 33.0))  # as the header says


@pytest.mark.parametrize("method", SUPPORT_METHODS)
@pytest.mark.parametrize("image, words", [("s_zerospacing.nhdr", "spacing"), ("s_skewed.nhdr", "not orthonormal")])
def test_a_support_with_degenerate_geometry_is_refused_in_one_line_naming_it(odd, tmp_path, method, image, words,
                                                                            capfd):
    out = tmp_path / "o.nii.gz"
    assert _segment(odd, method, out, supports=((image, "s1_label.nii.gz"),)) == 2
    [line] = capfd.readouterr().err.strip().splitlines()
    assert str(odd / image) in line and words in line and not out.exists()


@pytest.mark.parametrize("method, suffix", [("matched-support", ".nii.gz"), ("registration", ".seg.nrrd"),
                                            ("guided", ".nii.gz")])
def test_a_support_label_above_255_is_read_as_uint16_named_coloured_and_segmented(odd, tmp_path, method, suffix):
    read = read_labels(odd / "s1_label300.nii.gz")
    assert read.volume.array.dtype == np.uint16 and {s.value for s in read.segments} == {1, 300}
    out = tmp_path / f"o{suffix}"
    assert _segment(odd, method, out, supports=(("s1.nrrd", "s1_label300.nii.gz"),)) == 0
    labels = read_labels(out)
    assert set(np.unique(labels.volume.array).tolist()) <= {0, 1, 300} and labels.volume.array.dtype == np.uint16
    [s300] = [s for s in labels.segments if s.value == 300]
    assert s300.name == "label_300" and len(s300.color) == 3 and s300.color != read.segments[0].color
    assert "label_300" in {s["name"] for s in _report(out)["structures"]}


@pytest.mark.parametrize("method", SUPPORT_METHODS)
def test_supports_that_label_different_structures(odd, tmp_path, method, capfd):
    """Matched support takes each structure from the supports that label it; registration (and the guided
    registration prior) fuses structure by structure, so it refuses, naming the file that differs."""
    out = tmp_path / "o.nii.gz"
    code = _segment(odd, method, out, supports=(("s1.nrrd", "s1_label.nii.gz"), ("s2.nrrd", "s2_only1_label.nii.gz")))
    err = capfd.readouterr().err.strip().splitlines()
    if method == "matched-support":
        assert code == 0 and {s.name for s in read_labels(out).segments} == {"structure_1", "structure_2"}
        return
    [line] = err
    assert code == 2 and not out.exists()
    assert f"support 2 (labels {odd / 's2_only1_label.nii.gz'})" in line and "it lacks structure_2" in line


@pytest.mark.parametrize("method", SUPPORT_METHODS)
def test_a_structure_a_support_lists_but_never_labels_is_said_not_found(odd, tmp_path, method, capfd):
    out = tmp_path / "o.nii.gz"
    assert _segment(odd, method, out, supports=(("s1.nrrd", "s1_unlabelled2.nii.gz"),)) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert not (read_labels(out).volume.array == 2).any()
    structures = {s["name"]: s for s in _report(out)["structures"]}
    if method == "matched-support":  # left out of the run, and a warning names the file and the structure
        assert set(structures) == {"structure_1"}
        assert "s1_unlabelled2.nii.gz" in err and "'structure_2'" in err and "not segmented" in err
    else:
        assert structures["structure_2"]["status"] == "not found" and structures["structure_2"]["voxels"] == 0
