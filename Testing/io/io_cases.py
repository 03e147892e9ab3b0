"""Files and checks the I/O tests share: geometries to round-trip, the formats, one-line errors, a DICOM
series writer. Imported by the tests beside it (pytest puts their folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from phantoms import OBLIQUE, RAS_FLIP
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap, Segment, Volume

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


def _write_sitk(array: np.ndarray, path: Path, like: Volume | None = None) -> Path:
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like.to_sitk())
    sitk.WriteImage(image, str(path))
    return path
