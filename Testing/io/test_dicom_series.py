"""DICOM series read from a folder: missing, uneven or shifted slices put on a regular grid by Slicer's rule
(io/dicom_series.py), said in one warning line and recorded as a note; the series of a folder chosen,
named, or refused in one line. Real series, written with SimpleITK's GDCM writer."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from io_cases import one_line_error, write_dicom_series
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.dicom_series import abbreviated
from SAM2FewShotLib.io.volume import Volume
from SAM2FewShotLib.io.volume_io import read_geometry, read_volume

UID = "1.2.826.0.1.3680043.2.1125.4242.1"
OTHER = "1.2.826.0.1.3680043.2.1125.4242.2"
ORIGIN = (10.0, -5.0, 3.0)


def _ramp(slices: int = 10, spacing: float = 2.0) -> Volume:
    """Voxel value 5 x (distance from the first slice in mm): linear in z, so linear interpolation is exact."""
    array = (np.arange(slices)[:, None, None] * spacing * 5 + np.zeros((slices, 6, 5))).astype(np.int16)
    return Volume(array, (0.7, 0.8, spacing), ORIGIN)


def _series(folder: Path, volume: Volume, uid: str = UID, drop: tuple[int, ...] = ()) -> Path:
    write_dicom_series(volume, folder, uid)
    for k in drop:
        (folder / f"{uid}_{k:03d}.dcm").unlink()
    return folder


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_regular_series_is_read_as_it_is_without_a_note_or_a_warning(tmp_path, caplog):
    notes: list[dict] = []
    volume = read_volume(_series(tmp_path / "s", _ramp()), notes=notes)
    assert volume.array.shape == (10, 6, 5) and volume.spacing == pytest.approx((0.7, 0.8, 2.0))
    assert notes == [] and _warnings(caplog) == []


def test_a_missing_slice_is_put_on_a_regular_grid_by_linear_interpolation(tmp_path, caplog):
    """Slicer's rule: n acquired slices on n slices (last - first) / (n - 1) apart, each voxel linearly
    interpolated between the two acquired slices around it (here 9 slices 2.25 mm apart)."""
    folder = _series(tmp_path / "s", _ramp(), drop=(5,))
    notes: list[dict] = []
    volume = read_volume(folder, notes=notes)
    assert volume.array.shape == (9, 6, 5) and volume.array.dtype == np.int16
    assert volume.spacing == pytest.approx((0.7, 0.8, 2.25)) and volume.origin == pytest.approx(ORIGIN)
    expected = np.rint(5 * 2.25 * np.arange(9))  # the ramp, sampled at the regular positions
    assert np.array_equal(volume.array[:, 3, 2], expected) and np.all(volume.array == volume.array[:, :1, :1])
    [note] = notes
    assert note["dicom_series"] == UID and note["file"] == str(folder)
    assert (note["acquired_slices"], note["slices"], note["spacing_mm"]) == (9, 9, 2.25)
    assert (note["smallest_gap_mm"], note["largest_gap_mm"]) == (2.0, 4.0) and "linear interpolation" in note["rule"]
    [line] = _warnings(caplog)
    assert "missing or unevenly spaced slices" in line and "regular grid of 9 slices 2.25 mm apart" in line


def test_unevenly_spaced_slices_are_resampled_too(tmp_path):
    folder = _series(tmp_path / "s", _ramp(slices=6), drop=())
    moved = sitk.ReadImage(str(folder / f"{UID}_003.dcm"))  # slice 3 acquired 1 mm further than its place
    moved.SetMetaData("0020|0032", "\\".join(str(v) for v in (ORIGIN[0], ORIGIN[1], ORIGIN[2] + 7.0)))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / f"{UID}_003.dcm"))
    writer.Execute(moved)
    notes: list[dict] = []
    volume = read_volume(folder, notes=notes)
    assert volume.array.shape[0] == 6 and volume.spacing[2] == pytest.approx(2.0)
    # z = 6 mm lies between the slices acquired at 4 mm (value 20) and 7 mm (value 30): 20 + 10 * 2/3
    assert volume.array[3, 0, 0] == round(20 + 10 * 2 / 3)
    assert notes and notes[0]["largest_gap_mm"] == 3.0


def test_slices_shifted_in_their_plane_are_moved_back_where_they_were_acquired(tmp_path, caplog):
    """A tilted gantry: slice k was acquired k mm to the left; a line at one place in the patient stays there."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    tmp_path.joinpath("tilt").mkdir()
    for k in range(4):
        plane = np.zeros((1, 8, 8), np.int16)
        plane[0, :, k + 2] = 100  # column k + 2 of a slice whose origin is k mm to the left: x = 2 mm in the patient
        image = sitk.GetImageFromArray(plane)[:, :, 0]
        for tag, value in {"0008|0060": "CT", "0020|000d": "1.2.3", "0020|000e": UID, "0008|0018": f"{UID}.{k + 1}",
                           "0020|0013": str(k + 1), "0020|0032": f"{-k}\\0\\{2 * k}",
                           "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / "tilt" / f"{k}.dcm"))
        writer.Execute(image)
    notes: list[dict] = []
    volume = read_volume(tmp_path / "tilt", notes=notes)
    column = int(round((2.0 - volume.origin[0]) / volume.spacing[0]))  # x = 2 mm on the output grid
    assert volume.array.shape[2] > 8  # widened to hold every shifted slice
    assert volume.array[0, 0, column] == 100 and volume.array[-1, 0, column] == 100
    assert notes and notes[0]["largest_shift_mm"] > 1
    assert "shifted in their plane" in _warnings(caplog)[0]


def test_the_chosen_series_of_several_is_named_in_a_warning_line(tmp_path, caplog):
    folder = _series(tmp_path / "two", _ramp())
    _series(folder, _ramp(slices=3), uid=OTHER)
    assert read_volume(folder).array.shape[0] == 10  # the one with the most files
    [line] = _warnings(caplog)
    assert "holds 2 DICOM series" in line and UID in line and "--series" in line and "(3 files)" in line


def test_series_chooses_by_full_uid_or_its_end(tmp_path, caplog):
    folder = _series(tmp_path / "two", _ramp())
    _series(folder, _ramp(slices=3), uid=OTHER)
    assert read_volume(folder, series=OTHER).array.shape[0] == 3
    assert read_volume(folder, series=abbreviated(OTHER)).array.shape[0] == 3  # as the listing prints it
    assert _warnings(caplog) == []  # a choice made is not warned about


def test_an_unknown_series_is_refused_in_one_line_listing_the_series(tmp_path):
    folder = _series(tmp_path / "two", _ramp())
    _series(folder, _ramp(slices=3), uid=OTHER)
    message = one_line_error(read_volume, folder, series="9.9.9")
    assert "9.9.9 is not a series" in message and str(folder) in message
    assert f"{abbreviated(UID)} (10 files)" in message and f"{abbreviated(OTHER)} (3 files)" in message


def test_series_on_a_file_is_refused(tmp_path):
    folder = _series(tmp_path / "s", _ramp(slices=3))
    single = tmp_path / "one.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(next(folder.glob("*.dcm")))), str(single))
    with pytest.raises(InputError, match="is a file, not a DICOM folder"):
        read_volume(single, series=UID)


def test_the_geometry_of_a_folder_is_the_regularized_one(tmp_path):
    folder = _series(tmp_path / "s", _ramp(), drop=(2, 7))
    spacing, _ = read_geometry(folder)
    assert spacing[2] == pytest.approx(18 / 7)
