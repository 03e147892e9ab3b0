"""Volume and label-map I/O on real files: exact geometry through every format, Slicer segmentations,
DICOM series, the shared data sets, and bad input that must fail in one line and leave no file."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from phantoms import OBLIQUE, RAS_FLIP, REPO, phantom
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap, Segment, Volume, default_segments
from SAM2FewShotLib.io.volume_io import (
    image_suffix,
    read_labels,
    read_volume,
    sidecar_path,
    write_labels,
    write_volume,
)

GEOMETRIES = {
    "oblique": dict(direction=OBLIQUE),
    "ras_flip": dict(direction=RAS_FLIP),
    "identity_lps": dict(direction=np.eye(3)),
    "anisotropic": dict(spacing=(0.35, 1.4, 5.0), direction=OBLIQUE.T),
}
VOLUME_SUFFIXES = [".nii", ".nii.gz", ".nrrd", ".mha"]
LABEL_SUFFIXES = VOLUME_SUFFIXES + [".seg.nrrd"]
LIVER = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
    "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
)


def assert_same_geometry(a: Volume, b: Volume, atol: float = 1e-6) -> None:
    assert a.array.shape == b.array.shape
    assert np.allclose(a.spacing, b.spacing, atol=atol), (a.spacing, b.spacing)
    assert np.allclose(a.origin, b.origin, atol=atol), (a.origin, b.origin)
    assert np.allclose(a.direction, b.direction, atol=atol), (a.direction, b.direction)


def one_line_error(func, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def named_labels(labels: LabelMap) -> LabelMap:
    """The phantom's labels with a terminology entry and a segment that has no voxels."""
    first, second = labels.segments
    return labels.with_array(
        labels.volume.array,
        [Segment(1, "liver", (0.85, 0.4, 0.35), LIVER), second, Segment(7, "empty tumour", (0.1, 0.2, 0.9))],
    )


def write_dicom_series(volume: Volume, folder: Path, series_uid: str) -> None:
    """One file per slice with the patient-position tags a scanner writes (int16, oblique allowed)."""
    image = volume.to_sitk()
    axes = volume.direction_matrix
    orientation = "\\".join(f"{v:.12f}" for v in (*axes[:, 0], *axes[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder.mkdir(exist_ok=True)
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = "\\".join(f"{v:.12f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.77",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": position,
            "0020|0037": orientation,
            "0018|0050": str(volume.spacing[2]),
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}_{k:03d}.dcm"))
        writer.Execute(plane)


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


def test_seg_nrrd_header_is_what_slicer_reads(tmp_path):
    image, labels = phantom(direction=OBLIQUE)
    path = write_labels(named_labels(labels), tmp_path / "case.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == ["liver", "structure_2", "empty tumour"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2, 7]
    assert np.allclose(seg["segments"][0]["color"], (0.85, 0.4, 0.35))
    assert np.allclose(seg["ijkToLPS"], image.ijk_to_lps(), atol=1e-9)
    assert np.array_equal(seg["voxels"], labels.volume.array.transpose(2, 1, 0))


def test_slicer_mrml_opens_our_seg_nrrd_and_its_cropped_copy_fits_the_volume(tmp_path):
    mrml = pytest.importorskip("slicer_core")
    image, labels = phantom(direction=OBLIQUE)
    labels = named_labels(labels)
    ours = write_labels(labels, tmp_path / "ours.seg.nrrd")
    scene = mrml.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(ours))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    seen = [segmentation.GetNthSegment(n) for n in range(segmentation.GetNumberOfSegments())]
    assert [s.GetName() for s in seen] == [s.name for s in labels.segments]
    assert np.allclose([s.GetColor() for s in seen], [s.color for s in labels.segments])
    assert seen[0].GetTerminology() == LIVER

    # Slicer's own writer, cropped to the labelled extent as Slicer saves by default.
    cropped = tmp_path / "slicer.seg.nrrd"
    storage.SetFileName(str(cropped))
    storage.SetCropToMinimumExtent(True)
    assert storage.WriteData(node)
    alone = read_labels(cropped)
    assert alone.volume.array.shape != image.array.shape
    placed = read_labels(cropped, reference=image)
    assert_same_geometry(placed.volume, image)
    assert np.array_equal(placed.volume.array, labels.volume.array)
    assert [s.name for s in placed.segments] == [s.name for s in labels.segments]
    import nrrd

    header = nrrd.read_header(str(cropped))
    tags = [header[f"Segment{n}_Tags"] for n in range(3)]
    slicer_terms = [t.split("TerminologyEntry:", 1)[1].split("|", 1)[0] for t in tags]
    assert [s.terminology for s in placed.segments] == slicer_terms


def _seg_nrrd_on(path: Path, labels_ijk: np.ndarray, volume: Volume, start_ijk) -> None:
    """A segmentation whose voxel (0, 0, 0) sits at ``start_ijk`` of ``volume`` (may be fractional)."""
    ijk_to_lps = volume.ijk_to_lps()
    ijk_to_lps[:3, 3] = (ijk_to_lps @ np.append(np.asarray(start_ijk, float), 1.0))[:3]
    seg = slicerio.create_segmentation(labels_ijk.shape, ijk_to_lps)
    seg["voxels"] = labels_ijk.astype(np.uint8)
    seg["segments"] = [{"id": "s1", "name": "first", "color": [1, 0, 0], "labelValue": 1, "layer": 0},
                       {"id": "s2", "name": "second", "color": [0, 1, 0], "labelValue": 2, "layer": 0}]
    slicerio.write_segmentation(str(path), seg)


def test_cropped_seg_nrrd_is_padded_onto_the_reference_lattice(tmp_path):
    image, labels = phantom(direction=OBLIQUE)
    full_ijk = labels.volume.array.transpose(2, 1, 0)
    start = np.array([6, 4, 1])
    _seg_nrrd_on(tmp_path / "crop.seg.nrrd", full_ijk[6:40, 4:36, 1:11], image, start)
    placed = read_labels(tmp_path / "crop.seg.nrrd", reference=image)
    assert_same_geometry(placed.volume, image)
    assert np.array_equal(placed.volume.array, labels.volume.array)
    assert [s.name for s in placed.segments] == ["first", "second"]

    _seg_nrrd_on(tmp_path / "pad.seg.nrrd", np.pad(full_ijk, 2), image, [-2, -2, -2])  # larger than the volume
    assert np.array_equal(read_labels(tmp_path / "pad.seg.nrrd", reference=image).volume.array, labels.volume.array)

    _seg_nrrd_on(tmp_path / "half.seg.nrrd", full_ijk[6:40, 4:36, 1:11], image, start + [0.5, 0, 0])
    assert "different grids" in one_line_error(read_labels, tmp_path / "half.seg.nrrd", reference=image)


def test_seg_nrrd_layers_merge_only_without_overlap(tmp_path):
    image, labels = phantom(direction=OBLIQUE)
    first = labels.volume.array.transpose(2, 1, 0) == 1
    second = np.zeros_like(first)
    second[10:30, 10:30, 3:8] = True
    seg = slicerio.create_segmentation(first.shape, image.ijk_to_lps())
    slicerio.add_segment(seg, first, {"id": "a", "name": "organ", "color": [1, 0, 0]})
    slicerio.add_segment(seg, second, {"id": "b", "name": "box", "color": [0, 0, 1]})
    assert seg["voxels"].ndim == 4  # Slicer's layout: the overlapping box went to a second layer
    slicerio.write_segmentation(str(tmp_path / "overlap.seg.nrrd"), seg)
    assert "overlapping" in one_line_error(read_labels, tmp_path / "overlap.seg.nrrd")

    seg["voxels"][1][first] = 0  # the overlap is now empty, the layers stay
    slicerio.write_segmentation(str(tmp_path / "layers.seg.nrrd"), seg)
    merged = read_labels(tmp_path / "layers.seg.nrrd", reference=image)
    assert [s.name for s in merged.segments] == ["organ", "box"]
    organ, box = (merged.volume.array == s.value for s in merged.segments)
    assert organ.sum() == first.sum() and box.sum() == (second & ~first).sum()
    assert not (organ & box).any()


def _write_sitk(array: np.ndarray, path: Path, like: Volume | None = None) -> Path:
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like.to_sitk())
    sitk.WriteImage(image, str(path))
    return path


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
