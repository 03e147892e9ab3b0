"""Slicer segmentation files (.seg.nrrd): what Slicer reads, cropped and layered segmentations onto
the reference lattice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicerio

from io_cases import (
    LIVER,
    assert_same_geometry,
    named_labels,
    one_line_error,
)
from phantoms import OBLIQUE, phantom
from SAM2FewShotLib.io.volume import Volume
from SAM2FewShotLib.io.volume_io import (
    read_labels,
    write_labels,
)


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
