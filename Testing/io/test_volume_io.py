"""Volume and label-map files: exact geometry through every format, label names and colours in
sidecars, the shared data sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from io_cases import (
    GEOMETRIES,
    LABEL_SUFFIXES,
    LIVER,
    VOLUME_SUFFIXES,
    _write_sitk,
    assert_same_geometry,
    named_labels,
    one_line_error,
)
from phantoms import OBLIQUE, phantom
from SAM2FewShotLib.io.volume import LabelMap, Segment, default_segments
from SAM2FewShotLib.io.volume_io import (
    image_suffix,
    read_labels,
    read_volume,
    sidecar_path,
    write_labels,
    write_volume,
)


def test_image_suffix_keeps_compound_extensions():
    assert image_suffix("a/case_label.nii.gz") == ".nii.gz"
    assert image_suffix("Seg.SEG.NRRD") == ".seg.nrrd"
    assert image_suffix("x.mha") == ".mha"
    assert sidecar_path("data/case_label.nii.gz") == Path("data/case_label.json")
    assert sidecar_path("case.nrrd") == Path("case.json")


@pytest.mark.parametrize("suffix", VOLUME_SUFFIXES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_volume_round_trip_is_exact(tmp_path, geometry, suffix):
    image, _ = phantom(**GEOMETRIES[geometry])
    written = write_volume(image, tmp_path / f"image{suffix}")
    back = read_volume(written)
    assert_same_geometry(back, image)
    assert back.array.dtype == np.float32
    assert np.array_equal(back.array, image.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"image{suffix}"]  # no temporary left


@pytest.mark.parametrize("suffix", VOLUME_SUFFIXES)
def test_ct_voxel_type_is_kept(tmp_path, suffix):
    image, _ = phantom(direction=OBLIQUE)
    ct = image.with_array((image.array * 4 - 1000).astype(np.int16))
    back = read_volume(write_volume(ct, tmp_path / f"ct{suffix}"))
    assert back.array.dtype == np.int16
    assert np.array_equal(back.array, ct.array)


@pytest.mark.parametrize("suffix", LABEL_SUFFIXES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_labels_round_trip_with_names_colours_terminology(tmp_path, geometry, suffix):
    image, labels = phantom(**GEOMETRIES[geometry])
    labels = named_labels(labels)
    written = write_labels(labels, tmp_path / f"labels{suffix}")
    back = read_labels(written, reference=image)
    assert_same_geometry(back.volume, image)
    assert back.volume.array.dtype == np.uint8
    assert np.array_equal(back.volume.array, labels.volume.array)
    assert back.segments == labels.segments  # the empty segment 7 is kept
    expected_files = {f"labels{suffix}"} | (set() if suffix == ".seg.nrrd" else {"labels.json"})
    assert {p.name for p in tmp_path.iterdir()} == expected_files


@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd"])
def test_label_values_above_255_are_written_as_uint16(tmp_path, suffix):
    image, labels = phantom()
    array = labels.volume.array.astype(np.uint16) * 150  # values 150 and 300
    wide = LabelMap(labels.volume.with_array(array), (Segment(150, "a"), Segment(300, "b")))
    back = read_labels(write_labels(wide, tmp_path / f"wide{suffix}"), reference=image)
    assert back.volume.array.dtype == np.uint16
    assert np.array_equal(back.volume.array, array)
    assert back.segments == wide.segments


def test_plain_labels_get_default_segments(tmp_path):
    image, labels = phantom(n_objects=2)
    array = labels.volume.array.copy()
    array[array == 2] = 3
    back = read_labels(_write_sitk(array, tmp_path / "plain.nii.gz", image))
    assert back.segments == default_segments([1, 3])
    assert [s.name for s in back.segments] == ["label_1", "label_3"]


def test_json_sidecar_names_segments_and_keeps_empty_ones(tmp_path):
    image, labels = phantom(n_objects=2)
    path = _write_sitk(labels.volume.array, tmp_path / "case_label.nii.gz", image)
    listed = [
        {"value": 1, "name": "liver", "color": [0.9, 0.3, 0.2], "terminology": LIVER},
        {"value": 5, "name": "tumour", "color": [0.1, 0.1, 0.8]},
    ]
    (tmp_path / "case_label.json").write_text(json.dumps({"segments": listed}))
    back = read_labels(path, reference=image)
    assert back.segments == (
        Segment(1, "liver", (0.9, 0.3, 0.2), LIVER),
        Segment(5, "tumour", (0.1, 0.1, 0.8)),
        default_segments([2])[0],
    )
    (tmp_path / "case_label.json").write_text('{"segments": [{"value": 0, "name": "x"}]}')
    assert "case_label.json" in one_line_error(read_labels, path)


def test_float_label_file_with_integer_values_is_accepted(tmp_path):
    image, labels = phantom(n_objects=2)
    path = _write_sitk(labels.volume.array.astype(np.float32), tmp_path / "float.nrrd", image)
    back = read_labels(path)
    assert back.volume.array.dtype == np.uint8
    assert np.array_equal(back.volume.array, labels.volume.array)
    fractional = labels.volume.array.astype(np.float32) * 0.5
    bad = _write_sitk(fractional, tmp_path / "fraction.nrrd", image)
    assert "integer" in one_line_error(read_labels, bad)


def test_nifti_is_stored_ras_and_rewrites_to_the_same_geometry(tmp_path):
    image, _ = phantom(direction=OBLIQUE)
    path = write_volume(image, tmp_path / "oblique.nii")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    stored = [float(reader.GetMetaData(f"qoffset_{axis}")) for axis in "xyz"]
    assert np.allclose(stored, np.multiply(image.origin, (-1, -1, 1)), atol=1e-5)  # RAS on disk
    first = read_volume(path)
    second = read_volume(write_volume(first, tmp_path / "again.nii.gz"))
    assert_same_geometry(second, first)
    assert np.array_equal(second.array, first.array)


@pytest.mark.parametrize(
    "name, direction", [("example_ct_sm", np.diag([-1.0, -1.0, 1.0])), ("example_mr_sm", np.eye(3))]
)
def test_totalsegmentator_examples_image_and_seg_share_a_grid(shared_data, tmp_path, name, direction):
    folder = shared_data / "totalsegmentator_examples"
    image = read_volume(folder / f"{name}.nii.gz")
    assert image.array.dtype == np.int16
    assert np.allclose(image.direction_matrix, direction, atol=1e-6)  # CT stored RAS, MR stored LPS
    labels = read_labels(folder / f"{name}_seg.nii.gz", reference=image)
    assert image.same_grid(labels.volume)
    assert len(labels.segments) > 3
    again = read_volume(write_volume(image, tmp_path / "again.nii.gz"))
    assert_same_geometry(again, image)
    assert np.array_equal(again.array, image.array)


def test_msd_hippocampus_image_and_label(shared_data):
    folder = shared_data / "msd_hippocampus"
    image = read_volume(folder / "hippocampus_015_img.nii.gz")
    labels = read_labels(folder / "hippocampus_015_label.nii.gz", reference=image)
    assert image.same_grid(labels.volume)
    assert set(np.unique(labels.volume.array)) == {0, 1, 2}
    assert [s.name for s in labels.segments] == ["label_1", "label_2"]
