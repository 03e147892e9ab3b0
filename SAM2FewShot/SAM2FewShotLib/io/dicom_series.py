"""A DICOM series from a folder: which series is read, and missing or uneven slices put on a regular grid.

Choosing: a folder often holds a localizer or a derived series beside the one wanted. Without a
choice the series with the most files is read and a warning line names it (and how to choose
another); ``series`` (``--series UID`` on the command line, the same field in a request) picks one,
and an unknown UID is refused in one line listing the folder's series with their file counts.

Regular grid, by the rule of Slicer's DICOM scalar volume plugin (DICOMScalarVolumePlugin
.AcquisitionModeling, Slicer 5.10): ITK stacks the sorted slices on a grid from the first slice's
position with the spacing (last - first) / (n - 1). Slicer compares each slice's corners on that
grid with the corners its ImagePositionPatient gives; when any differs by more than 1e-3 mm (a
missing slice, uneven spacing, a tilted gantry) it adds a grid transform that moves each slice to
where it was acquired, and "harden" resamples the volume through it with linear interpolation:
same spacing, same axes, the extent of the moved slices. We apply exactly that: every voxel of the
regular grid takes the linear interpolation between the two acquired slices around it. The report
records it (input_notes) and one warning line says it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..common.errors import InputError
from .itk_output import itk_reason, native_output_captured

log = logging.getLogger(__name__)

CORNER_TOLERANCE_MM = 1e-3  # Slicer's AcquisitionModeling cornerEpsilon
POSITION_TAG = "0020|0032"  # ImagePositionPatient
RULE = ("resampled onto a regular grid by linear interpolation between the acquired slices (Slicer's DICOM "
        "acquisition geometry regularization, hardened); the files are not changed")


def read_dicom_series(folder: Path, series: str | None = None):
    """(SimpleITK image, note or None): the chosen series of ``folder`` on a regular grid."""
    import SimpleITK as sitk


    found = series_files(folder)
    chosen = choose_series(folder, found, series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(found[chosen])
    reader.MetaDataDictionaryArrayUpdateOn()  # each file's ImagePositionPatient, without reading it again
    try:
        with native_output_captured():
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM series {chosen} in {folder}: {itk_reason(exc)}") from exc
    positions = _slice_positions(reader, len(found[chosen]))
    if (positions is None or image.GetDimension() != 3 or image.GetDepth() != len(positions)
            or image.GetNumberOfComponentsPerPixel() != 1):
        return image, None  # one multi-frame file, slices without positions, colour: read as ITK stacks them
    return regularized(image, positions, folder, chosen)


def series_files(folder: Path) -> dict[str, list[str]]:
    """Every DICOM series in ``folder``: UID -> its files, sorted along the slice normal."""
    import SimpleITK as sitk


    reader = sitk.ImageSeriesReader()
    with native_output_captured():
        found = {sid: list(reader.GetGDCMSeriesFileNames(str(folder), sid))
                 for sid in reader.GetGDCMSeriesIDs(str(folder))}
    if not found:
        raise InputError(f"cannot read {folder}: the folder holds no DICOM series")
    return found


def choose_series(folder: Path, found: dict[str, list[str]], wanted: str | None) -> str:
    """The series UID to read: ``wanted`` (the full UID, or an end of it that only one series has),
    else the one with the most files, named in a warning line when there are several."""
    if wanted is not None:
        key = wanted.strip().lstrip(".\u2026")
        matches = [sid for sid in found if sid == key] or [sid for sid in found if key and sid.endswith(key)]
        if len(matches) != 1:
            why = "matches several series" if matches else "is not a series"
            raise InputError(f"the DICOM series {wanted} {why} of {folder}; it holds {_listing(found)}")
        return matches[0]
    chosen = max(found, key=lambda sid: len(found[sid]))
    if len(found) > 1:
        others = {sid: files for sid, files in found.items() if sid != chosen}
        log.warning("%s holds %d DICOM series; reading %s (%d files, the most); others: %s (choose one with "
                    "--series UID)", folder, len(found), chosen, len(found[chosen]), _listing(others))
    return chosen


def abbreviated(uid: str, keep: int = 16) -> str:
    """A long UID by its end (what tells series of one study apart); --series accepts that end."""
    return uid if len(uid) <= keep + 4 else "..." + uid[-keep:]


def _listing(found: dict[str, list[str]], shown: int = 6) -> str:
    items = sorted(found.items(), key=lambda item: -len(item[1]))
    text = ", ".join(f"{abbreviated(sid)} ({len(files)} file{'s' if len(files) != 1 else ''})"
                     for sid, files in items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _slice_positions(reader, count: int) -> np.ndarray | None:
    """(n, 3) ImagePositionPatient of every file in reading order, or None when one lacks it."""
    positions = []
    for index in range(count):
        if not reader.HasMetaDataKey(index, POSITION_TAG):
            return None
        try:
            values = [float(v) for v in reader.GetMetaData(index, POSITION_TAG).strip().split("\\")]
        except ValueError:
            return None
        if len(values) != 3 or not np.all(np.isfinite(values)):
            return None
        positions.append(values)
    return np.asarray(positions, dtype=float)


def regularized(image, positions: np.ndarray, folder: Path, uid: str):
    """(image, note): ``image`` as read when every slice sits on ITK's grid, else resampled (module doc)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    normal = direction[:, 2]
    grid = origin + np.arange(len(positions))[:, None] * spacing[2] * normal
    deviation = float(np.abs(positions - grid).max()) if len(positions) > 1 else 0.0
    if deviation <= CORNER_TOLERANCE_MM:
        return image, None
    along = (positions - positions[0]) @ normal  # where each slice was acquired, along the normal
    gaps = np.diff(along)
    if np.any(gaps <= CORNER_TOLERANCE_MM):
        raise InputError(f"cannot read DICOM series {uid} in {folder}: two of its slices lie at the same position "
                         "(it mixes acquisitions or repeats a file)")
    shift = (positions - positions[0]) - along[:, None] * normal  # in-plane offset of each slice (gantry tilt)
    resampled = _resample(image, along, shift, direction, spacing)
    note = {"file": str(folder), "dicom_series": uid, "rule": RULE, "acquired_slices": len(positions),
            "slices": resampled.GetDepth(), "spacing_mm": round(float(spacing[2]), 6),
            "smallest_gap_mm": round(float(gaps.min()), 6), "largest_gap_mm": round(float(gaps.max()), 6),
            "largest_shift_mm": round(deviation, 6)}
    log.warning("%s: DICOM series %s has %s; read onto a regular grid of %d slices %.4g mm apart by linear "
                "interpolation between the acquired slices, as Slicer does (the report's input_notes records it)",
                folder, abbreviated(uid), _irregularity(gaps, shift), resampled.GetDepth(), spacing[2])
    return resampled, note


def _irregularity(gaps: np.ndarray, shift: np.ndarray) -> str:
    """What is irregular about the acquired slices, in words."""
    parts = []
    if gaps.max() - gaps.min() > CORNER_TOLERANCE_MM:
        parts.append(f"missing or unevenly spaced slices (gaps of {gaps.min():.4g} to {gaps.max():.4g} mm "
                     f"between {len(gaps) + 1} slices)")
    moved = float(np.linalg.norm(shift, axis=1).max())
    if moved > CORNER_TOLERANCE_MM:
        parts.append(f"slices shifted in their plane by up to {moved:.4g} mm (a tilted gantry)")
    return " and ".join(parts) or "slices off the grid ITK stacks them on"


def _resample(image, along: np.ndarray, shift: np.ndarray, direction: np.ndarray, spacing: np.ndarray):
    """The regular grid's voxels from the acquired slices: for each output slice, the fractional input
    slice acquired at its position (piecewise linear in the positions) and that slice's in-plane shift."""
    import SimpleITK as sitk

    columns, rows = image.GetSize()[:2]
    in_plane = shift @ direction[:, :2]  # (n, 2) offsets along the row and column axes, mm
    low = np.ceil(np.maximum(0.0, -in_plane.min(axis=0)) / spacing[:2] - CORNER_TOLERANCE_MM).astype(int)
    high = np.ceil(np.maximum(0.0, in_plane.max(axis=0)) / spacing[:2] - CORNER_TOLERANCE_MM).astype(int)
    depth = int(np.ceil(along[-1] / spacing[2] + 1 - CORNER_TOLERANCE_MM))
    size = (int(columns + low[0] + high[0]), int(rows + low[1] + high[1]), depth)
    origin = np.asarray(image.GetOrigin()) - direction[:, :2] @ (low * spacing[:2])
    wanted = np.arange(depth) * spacing[2]  # each output slice's distance from the first, along the normal
    source = np.interp(wanted, along, np.arange(len(along)))  # fractional input slice acquired there
    offset = np.stack([np.interp(source, np.arange(len(along)), shift[:, d]) for d in range(3)], axis=1)
    displacement = (source - np.arange(depth))[:, None] * spacing[2] * direction[:, 2] - offset  # (depth, 3)
    field = _displacement_field(displacement, size, origin, direction, spacing)
    output = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), size, sitk.DisplacementFieldTransform(field),
                           sitk.sitkLinear, origin.tolist(), spacing.tolist(), direction.ravel().tolist(), 0.0,
                           sitk.sitkFloat32)
    return _cast_like(output, image)


def _displacement_field(displacement: np.ndarray, size: tuple, origin, direction, spacing):
    """A field constant within each output slice, on a lattice one node wider than the output on every
    side (ITK takes no displacement outside its field)."""
    import SimpleITK as sitk

    depth = len(displacement)
    values = np.concatenate([displacement[:1], displacement, displacement[-1:]])  # (depth + 2, 3)
    array = np.broadcast_to(values[:, None, None, :], (depth + 2, 2, 2, 3)).astype(np.float64)
    field = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=True)
    step = np.array([(size[0] + 1) * spacing[0], (size[1] + 1) * spacing[1], spacing[2]])
    field.SetSpacing(step.tolist())
    field.SetDirection(direction.ravel().tolist())
    field.SetOrigin((np.asarray(origin) - direction @ np.array(spacing)).tolist())
    return field


def _cast_like(output, image):
    """Back to the series' voxel type, rounded to the nearest value (as Slicer's reslice does)."""
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(output)
    dtype = sitk.GetArrayViewFromImage(image).dtype
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    result = sitk.GetImageFromArray(array.astype(dtype, copy=False))
    result.CopyInformation(output)
    return result
