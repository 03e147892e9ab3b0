"""Volumes as clinics have them (issue 13, first part): 4D series and vector/colour images.

A 4D query (cine, DWI, multi-echo) or a vector one is segmented frame by frame or component by
component when the user names one (--frame N, --component N); without it, one line naming the
option and how many there are, never a silent pick. Real files, the real CLI, the real SAM2
architecture with random weights at 128 px.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from phantoms import phantom
from SAM2FewShotLib.cli.main import main
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume_io import read_labels, read_volume, write_labels
from SAM2FewShotLib.run import protocol

RANDOM = ["--random-weights", "--image-size", "128", "--device", "cpu"]
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
