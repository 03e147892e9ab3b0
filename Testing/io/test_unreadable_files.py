"""Inputs that are not what they should be: DICOM series, truncated and unreadable files, labels on
another grid, outputs that cannot be written; each fails in one line and leaves no file."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk

from io_cases import (
    _write_sitk,
    assert_same_geometry,
    one_line_error,
    write_dicom_series,
)
from phantoms import OBLIQUE, REPO, phantom
from SAM2FewShotLib.io.volume import LabelMap, Segment, Volume
from SAM2FewShotLib.io.volume_io import (
    read_labels,
    read_volume,
    write_labels,
    write_volume,
)


def test_oblique_dicom_series_reads_back(tmp_path):
    image, _ = phantom(direction=OBLIQUE)
    ct = image.with_array((image.array * 3 - 1000).astype(np.int16))
    write_dicom_series(ct, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.77.1")
    back = read_volume(tmp_path / "dicom")
    assert_same_geometry(back, ct, atol=1e-4)
    assert back.array.dtype == np.int16
    assert np.array_equal(back.array, ct.array)


def test_dicom_folder_with_two_series_reads_the_larger(tmp_path, caplog):
    big, _ = phantom(direction=OBLIQUE)
    small, _ = phantom(shape_kji=(4, 20, 24))
    write_dicom_series(big.with_array(big.array.astype(np.int16)), tmp_path / "dicom", "1.2.3.444")
    write_dicom_series(small.with_array(small.array.astype(np.int16)), tmp_path / "dicom", "1.2.3.555")
    with caplog.at_level(logging.INFO, logger="SAM2FewShotLib.io.volume_io"):
        back = read_volume(tmp_path / "dicom")
    assert back.array.shape == big.array.shape
    assert any("1.2.3.444" in r.getMessage() for r in caplog.records)


def test_unreadable_inputs_fail_in_one_line(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    assert str(missing) in one_line_error(read_volume, missing)
    assert str(missing) in one_line_error(read_labels, missing)
    (tmp_path / "empty").mkdir()
    assert "no DICOM series" in one_line_error(read_volume, tmp_path / "empty")
    (tmp_path / "junk.nrrd").write_text("not an image")
    assert "junk.nrrd" in one_line_error(read_volume, tmp_path / "junk.nrrd")
    png = tmp_path / "slice.png"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(png))
    assert "unknown image format" in one_line_error(read_volume, png)
    flat = _write_sitk(np.zeros((8, 9), np.int16), tmp_path / "flat.nrrd")
    assert "2D image" in one_line_error(read_volume, flat)
    series = sitk.JoinSeries([sitk.Image(6, 5, 4, sitk.sitkFloat32)] * 3)
    sitk.WriteImage(series, str(tmp_path / "time.nii.gz"))
    assert "4D series of 3 frames" in one_line_error(read_volume, tmp_path / "time.nii.gz")  # --frame N
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    assert "3 components" in one_line_error(read_volume, tmp_path / "rgb.nrrd")


def test_truncated_nifti_is_refused_but_multi_member_gzip_is_read(tmp_path):
    image, _ = phantom()
    raw = write_volume(image, tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-100])  # ITK alone would read the missing voxels as zeros
    assert "truncated" in one_line_error(read_volume, tmp_path / "cut.nii")
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw)[:-200])
    assert "truncated" in one_line_error(read_volume, tmp_path / "cut.nii.gz")
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    assert np.array_equal(read_volume(tmp_path / "members.nii.gz").array, image.array)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_a_single_time_point_reads_as_a_3d_volume(tmp_path, suffix):
    image, _ = phantom(direction=OBLIQUE)
    sitk.WriteImage(sitk.JoinSeries([image.to_sitk()]), str(tmp_path / f"one{suffix}"))  # size 1 in t
    back = read_volume(tmp_path / f"one{suffix}")
    assert_same_geometry(back, image)
    assert np.array_equal(back.array, image.array)


def test_labels_on_another_grid_are_refused(tmp_path):
    image, labels = phantom(direction=OBLIQUE)
    shifted = LabelMap(Volume(labels.volume.array, image.spacing, (0.0, 0.0, 0.0), image.direction), labels.segments)
    for suffix in (".nii.gz", ".seg.nrrd"):
        path = write_labels(shifted, tmp_path / f"shifted{suffix}")
        assert "different grids" in one_line_error(read_labels, path, reference=image)


def test_unwritable_outputs_leave_nothing(tmp_path):
    image, labels = phantom()
    blocker = tmp_path / "a_file"
    blocker.write_text("keep")
    for target in ("out.nii.gz", "out.seg.nrrd"):
        assert "cannot write" in one_line_error(write_labels, labels, blocker / target)
    assert "cannot write" in one_line_error(write_volume, image, blocker / "out.nrrd")
    assert "does not exist" in one_line_error(write_volume, image, tmp_path / "missing" / "out.nrrd")
    assert "unsupported format" in one_line_error(write_volume, image, tmp_path / "out.mhd")
    bad_term = labels.with_array(labels.volume.array, [Segment(1, "x", terminology="no tildes")])
    assert "terminology" in one_line_error(write_labels, bad_term, tmp_path / "bad.seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert blocker.read_text() == "keep"


FILLING_THE_DISK = textwrap.dedent(
    """
    import json, resource, signal, sys
    import numpy as np
    from SAM2FewShotLib.common.errors import InputError
    from SAM2FewShotLib.io.volume import LabelMap, Volume
    from SAM2FewShotLib.io.volume_io import write_labels, write_volume

    rng = np.random.default_rng(0)  # noise does not compress: every file outgrows the limit
    volume = Volume(rng.standard_normal((30, 60, 60)).astype(np.float32), (1, 1, 1), (0, 0, 0))
    labels = LabelMap(volume.with_array(rng.integers(0, 250, (30, 60, 60), dtype=np.uint8)))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
    outcome = {}
    for path in sys.argv[1:]:
        try:
            (write_labels(labels, path) if "labels" in path else write_volume(volume, path))
            outcome[path] = "written"
        except InputError as exc:
            outcome[path] = str(exc)
    print(json.dumps(outcome))
    """
)


def test_a_write_that_fails_midway_leaves_no_file_and_keeps_the_old_one(tmp_path):
    names = ["image.nii", "image.nii.gz", "image.nrrd", "image.mha", "labels.nii.gz", "labels.seg.nrrd"]
    old, fresh = tmp_path / "old", tmp_path / "fresh"
    old.mkdir()
    fresh.mkdir()
    for name in names + ["labels.json"]:
        (old / name).write_bytes(b"previous result " + name.encode())
    targets = [str(folder / name) for folder in (old, fresh) for name in names]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "SAM2FewShot")]))
    run = subprocess.run(
        [sys.executable, "-c", FILLING_THE_DISK, *targets], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout)
    for target in targets:
        assert outcome[target].startswith(f"cannot write {target}"), outcome[target]
        assert "\n" not in outcome[target]
    assert sorted(p.name for p in fresh.iterdir()) == []
    assert sorted(p.name for p in old.iterdir()) == sorted(names + ["labels.json"])
    for name in names + ["labels.json"]:
        assert (old / name).read_bytes() == b"previous result " + name.encode()
