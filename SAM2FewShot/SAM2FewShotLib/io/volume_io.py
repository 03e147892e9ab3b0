"""Volumes and label maps from and to files, with their exact geometry, voxel type and segment names.

SimpleITK reads every format into LPS, so a NIfTI (RAS on disk), an NRRD and a DICOM series of the
same patient give the same Volume. Writes go to a temporary file beside the target and are moved
into place only when complete: a failed write never leaves a partial file or touches an old one.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import InputError, one_line
from ..common.files import final_path, replacing
from ..common.warnings_summary import RepeatedWarnings
from .dicom_series import read_dicom_series
from .headers import check_data_files
from .itk_output import itk_reason as _itk_reason
from .itk_output import native_output_captured
from .seg_nrrd import is_slicer_segmentation, read_seg_nrrd, write_seg_nrrd
from .volume import MAX_LABEL, LabelMap, Segment, Volume, default_segments

log = logging.getLogger(__name__)

PathLike = str | Path

SEG_NRRD = ".seg.nrrd"
READ_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", SEG_NRRD)
# Single-file formats only: a header + data pair (.nhdr, .mhd) cannot be moved into place atomically.
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
_COMPOUND_SUFFIXES = (SEG_NRRD, ".nii.gz")


def image_suffix(path: PathLike) -> str:
    """The full, lower-case extension: '.nii.gz' and '.seg.nrrd' count as one."""
    name = Path(path).name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return Path(name).suffix


def sidecar_path(path: PathLike) -> Path:
    """Where the names and colours of a plain label file live: case_label.nii.gz -> case_label.json."""
    path = Path(path)
    return path.with_name(path.name[: len(path.name) - len(image_suffix(path))] + ".json")


# ---------------------------------------------------------------------------------------- reading


def read_volume(path: PathLike, frame: int | None = None, component: int | None = None,
                series: str | None = None, notes: list[dict] | None = None) -> Volume:
    """A 3D scalar volume from NIfTI, NRRD, MetaImage or a DICOM series folder, voxel type kept.

    A 4D series (cine, DWI, multi-echo) needs ``frame`` and a vector or colour image ``component``:
    without it, one line naming the option and how many there are; never a silent pick. ``series``
    chooses a DICOM series of a folder (io/dicom_series.py); what was done to an input to read it
    (a DICOM series put on a regular grid) is appended to ``notes``, for the report.
    """
    path = Path(path)
    return _volume_from_sitk(_read_sitk(path, series, notes), path, frame, component)


def read_labels(path: PathLike, reference: Volume | None = None) -> LabelMap:
    """A label map with its segments; on ``reference``'s grid when one is given."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if is_slicer_segmentation(path):
        check_data_files(path)
        volume, listed = read_seg_nrrd(path)
        volume = volume.with_array(_label_array(volume.array, path))
        if reference is not None:
            volume = _onto_reference(volume, reference, path)
    else:
        volume = read_volume(path)
        volume = volume.with_array(_label_array(volume.array, path))
        listed = _read_sidecar(_sidecar_of(path))
        if reference is not None:
            reference.require_same_grid(volume, what=f"labels {path}")
            volume = reference.with_array(volume.array)  # the query's exact geometry, not a float32 copy
    return LabelMap(volume, _complete_segments(listed, volume.array))


def read_geometry(path: PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(spacing, direction) of a volume from its header alone (a DICOM folder is read whole)."""
    import SimpleITK as sitk

    path = Path(path)
    if path.is_file() and image_suffix(path) in READ_SUFFIXES:
        check_data_files(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            with native_output_captured():
                reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(f"cannot read {path}: {_itk_reason(exc)}") from exc
        if reader.GetDimension() == 3:
            return reader.GetSpacing(), reader.GetDirection()
    volume = read_volume(path)  # a DICOM folder, a 4D file of one frame, or a one-line error
    return volume.spacing, volume.direction


def _read_sitk(path: Path, series: str | None = None, notes: list[dict] | None = None):
    import SimpleITK as sitk

    if path.is_dir():
        image, note = read_dicom_series(path, series)
        if note is not None and notes is not None:
            notes.append(note)
        return image
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if series is not None:
        raise InputError(f"a DICOM series ({series}) was chosen, but {path} is a file, not a DICOM folder")
    suffix = image_suffix(path)
    if suffix not in READ_SUFFIXES:
        raise InputError(
            f"cannot read {path}: unknown image format {suffix or '(no extension)'!r} "
            f"(expected {', '.join(READ_SUFFIXES)} or a DICOM series folder)"
        )
    check_data_files(path)  # a detached header's data beside it, a regular file: before ITK opens it
    try:
        with native_output_captured():
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: {_itk_reason(exc)}") from exc
    if _is_nifti(path) and not _nifti_is_complete(path):
        raise InputError(f"cannot read {path}: the file is truncated (less data than its header announces)")
    return image


def _volume_from_sitk(img, path: Path, frame: int | None = None, component: int | None = None) -> Volume:
    size = "x".join(str(n) for n in img.GetSize())
    frames = img.GetSize()[3] if img.GetDimension() == 4 else 1
    if img.GetDimension() == 4 and frames > 1:
        if frame is None:
            raise InputError(f"{path} is a 4D series of {frames} frames ({size} voxels): choose one with "
                             f"--frame N (0 to {frames - 1})")
        if not 0 <= frame < frames:
            raise InputError(f"--frame {frame} is outside the {frames} frames of {path} (0 to {frames - 1})")
        img = img[:, :, :, int(frame)]
    elif frame not in (None, 0):
        raise InputError(f"--frame {frame} was given, but {path} has one frame")
    elif img.GetDimension() == 4:
        img = img[:, :, :, 0]  # a 3D volume stored with a trailing time axis of one
    if img.GetDimension() != 3:
        raise InputError(f"{path} is a {img.GetDimension()}D image ({size} voxels); a 3D volume is needed")
    components = img.GetNumberOfComponentsPerPixel()
    if components != 1:
        if component is None:
            raise InputError(f"{path} has {components} components per voxel (a vector or colour image): choose "
                             f"one with --component N (0 to {components - 1})")
        if not 0 <= component < components:
            raise InputError(f"--component {component} is outside the {components} components of {path} "
                             f"(0 to {components - 1})")
        import SimpleITK as sitk

        img = sitk.VectorIndexSelectionCast(img, int(component))
    elif component not in (None, 0):
        raise InputError(f"--component {component} was given, but {path} has one component per voxel")
    return Volume.from_sitk(img)


def _label_array(array: np.ndarray, path: PathLike) -> np.ndarray:
    """Labels as the smallest unsigned type; float files are fine when every value is an integer."""
    if array.dtype.kind not in "biuf":
        raise InputError(f"{path}: label voxels must be integers, got {array.dtype}")
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise InputError(f"{path}: label voxels must be integers, found NaN values")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise InputError(f"{path}: label voxels must be integers, found fractional values")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0:
        raise InputError(f"{path}: label values must not be negative, found {low}")
    if high > MAX_LABEL:
        raise InputError(f"{path}: label value {high:g} is too large: label maps hold values up to {MAX_LABEL}")
    dtype = np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16
    return array.astype(dtype, copy=False)


def _present_values(array: np.ndarray) -> list[int]:
    """Non-zero values in an unsigned label array; a per-slice histogram keeps memory flat."""
    if array.dtype.itemsize > 2:
        return [int(v) for v in np.unique(array) if v]
    counts = np.zeros(np.iinfo(array.dtype).max + 1, dtype=np.int64)
    for plane in array:
        counts += np.bincount(plane.ravel(), minlength=counts.size)
    return [int(v) for v in np.flatnonzero(counts[1:]) + 1]


def _complete_segments(listed: Sequence[Segment], array: np.ndarray) -> tuple[Segment, ...]:
    """Listed segments (empty ones too), then defaults for voxel values nobody named."""
    known = {s.value for s in listed}
    extra = default_segments([v for v in _present_values(array) if v not in known])
    return _unique_names(list(listed) + list(extra))


def _unique_names(segments: list[Segment]) -> tuple[Segment, ...]:
    """Slicer allows two segments with one name; a LabelMap does not, so later ones get the value."""
    seen: set[str] = set()
    out = []
    with RepeatedWarnings(log) as warnings:
        for segment in segments:
            name = segment.name
            while name in seen:
                name = f"{name}_{segment.value}"
            if name != segment.name:
                warnings.add("repeated segment names, later values renamed '<name>_<value>'", repr(name),
                             f"segment name {segment.name!r} is repeated; value {segment.value} is named {name!r}")
                segment = Segment(segment.value, name, segment.color, segment.terminology)
            seen.add(name)
            out.append(segment)
    return tuple(out)


def _onto_reference(volume: Volume, reference: Volume, path: Path) -> Volume:
    """A segmentation Slicer cropped to its extent, placed back on the reference volume's lattice."""
    what = f"labels {path}"
    if reference.same_grid(volume):
        return reference.with_array(volume.array)
    same_axes = np.allclose(volume.spacing, reference.spacing, atol=1e-4) and np.allclose(
        volume.direction, reference.direction, atol=1e-4
    )
    if not same_axes:
        reference.require_same_grid(volume, what=what)
    shift = np.linalg.solve(reference.ijk_to_lps()[:3, :3], np.subtract(volume.origin, reference.origin))
    if not np.allclose(shift, np.round(shift), atol=1e-3):
        reference.require_same_grid(volume, what=what)
    offset_kji = [int(v) for v in np.round(shift)[::-1]]
    placed = np.zeros(reference.array.shape, dtype=volume.array.dtype)
    src, dst = _overlap(volume.array.shape, reference.array.shape, offset_kji)
    placed[dst] = volume.array[src]
    dropped = int(np.count_nonzero(volume.array)) - int(np.count_nonzero(placed))
    if dropped:
        log.warning("%s: %d labelled voxels lie outside the volume and were dropped", path, dropped)
    return reference.with_array(placed)


def _overlap(source: Sequence[int], target: Sequence[int], offset: Sequence[int]):
    """Slices of source and target that coincide when source index n sits at target index n + offset."""
    src, dst = [], []
    for n_src, n_dst, off in zip(source, target, offset, strict=True):
        start, stop = max(0, -off), max(max(0, -off), min(n_src, n_dst - off))
        src.append(slice(start, stop))
        dst.append(slice(start + off, stop + off))
    return tuple(src), tuple(dst)


def _sidecar_of(path: Path) -> Path:
    """The sidecar beside the name given, else (for a symlink) beside its target, where writes put it."""
    beside = sidecar_path(path)
    if beside.is_file() or not path.is_symlink():
        return beside
    return sidecar_path(path.resolve())


def _read_sidecar(path: Path) -> list[Segment]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read label metadata {path}: {one_line(exc)}") from exc
    try:
        return [_segment_from_json(item) for item in data["segments"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"{path}: bad segment list ({one_line(exc)}); expected "
            '{"segments": [{"value": 1, "name": "liver", "color": [r, g, b]}]}'
        ) from exc


def _segment_from_json(item: dict[str, Any]) -> Segment:
    value = item["value"]
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError(f"value {value!r} is not a positive integer")
    value = int(value)
    color = tuple(float(c) for c in item.get("color", default_segments([value])[0].color))
    if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
        raise ValueError(f"color {list(color)} must be three numbers in 0..1")
    terminology = item.get("terminology")
    return Segment(value, str(item["name"]), color, None if terminology is None else str(terminology))


def _sidecar_text(segments: Sequence[Segment]) -> str:
    items = []
    for s in segments:
        item: dict[str, Any] = {"value": s.value, "name": s.name, "color": [float(c) for c in s.color]}
        if s.terminology is not None:
            item["terminology"] = s.terminology
        items.append(item)
    return json.dumps({"segments": items}, indent=2) + "\n"


# ---------------------------------------------------------------------------------------- writing


def write_volume(volume: Volume, path: PathLike, compress: bool = True) -> Path:
    """Write ``volume`` with its exact geometry and voxel type; returns the path written."""
    path = Path(path)
    _require_suffix(path, WRITE_SUFFIXES)
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    image = volume.with_array(array).to_sitk()
    _write_atomically({path: lambda tmp: _write_image(image, tmp, compress)})
    return path


def write_labels(labels: LabelMap, path: PathLike, compress: bool = True) -> Path:
    """A .seg.nrrd Slicer opens with names and colours, or a plain label file plus its JSON sidecar."""
    path = Path(path)
    _require_suffix(path, WRITE_SUFFIXES + (SEG_NRRD,))
    array = _writable_labels(labels)
    if image_suffix(path) == SEG_NRRD:
        _write_atomically({path: lambda tmp: write_seg_nrrd(labels, array, tmp)})
        return path
    image = labels.volume.with_array(array).to_sitk()
    text = _sidecar_text(labels.segments)
    _write_atomically(
        {
            path: lambda tmp: _write_image(image, tmp, compress),
            sidecar_path(final_path(path)): lambda tmp: tmp.write_text(text, encoding="utf-8"),  # by a link's target
        }
    )
    return path


def _writable_labels(labels: LabelMap) -> np.ndarray:
    """uint8 when every value fits, else uint16 (what Slicer and most tools read as a label map)."""
    array = _label_array(labels.volume.array, "labels")
    high = max([int(array.max()) if array.size else 0] + labels.values)
    if high > np.iinfo(np.uint16).max:
        raise InputError(f"label value {high} does not fit a 16-bit label map")
    return array.astype(np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16, copy=False)


def _require_suffix(path: Path, allowed: Sequence[str]) -> None:
    suffix = image_suffix(path)
    if suffix not in allowed:
        raise InputError(
            f"cannot write {path}: unsupported format {suffix or '(no extension)'!r} (use {', '.join(allowed)})"
        )


def _write_image(image, path: Path, compress: bool) -> None:
    import SimpleITK as sitk

    with native_output_captured():
        sitk.WriteImage(image, str(path), useCompression=compress)
    if _is_nifti(path) and not _nifti_is_complete(path):
        raise OSError("the file was written incompletely (disk full or file size limit?)")


def _is_nifti(path: Path) -> bool:
    return image_suffix(path) in (".nii", ".nii.gz")


def _nifti_is_complete(path: Path) -> bool:
    """ITK reads and writes truncated NIfTI files without a word (the rest becomes zeros)."""
    compressed = image_suffix(path) == ".nii.gz"
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            expected = _nifti_announced_bytes(f.read(544))
        if not compressed:
            return path.stat().st_size >= expected
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)  # gzip trailer: uncompressed size modulo 2**32
            if int.from_bytes(f.read(4), "little") == expected % 2**32:
                return True
        with gzip.open(path, "rb") as f:  # several gzip members: count them all (rare, slow)
            return sum(len(block) for block in iter(lambda: f.read(1 << 24), b"")) >= expected
    except (EOFError, struct.error, ValueError, OSError, zlib.error):
        return False


def _nifti_announced_bytes(header: bytes) -> int:
    """Header plus data size (vox_offset + voxels * bitpix / 8) of a NIfTI-1 or NIfTI-2 header."""
    for order in "<>":
        (size,) = struct.unpack(order + "i", header[:4])
        if size == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            (bitpix,) = struct.unpack(order + "h", header[72:74])
            (offset,) = struct.unpack(order + "f", header[108:112])
        elif size == 540:
            (bitpix,) = struct.unpack(order + "h", header[14:16])
            dims = struct.unpack(order + "8q", header[16:80])
            (offset,) = struct.unpack(order + "q", header[168:176])
        else:
            continue
        voxels = int(np.prod([max(1, d) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
        return int(offset) + voxels * bitpix // 8
    raise ValueError("not a NIfTI header")


def _write_atomically(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Each writer fills a temporary file beside its target; all are moved into place at the end."""
    for target in writers:
        _require_folder(target)
    current = next(iter(writers))
    temp = current
    try:
        with contextlib.ExitStack() as stack:  # on success every temporary is renamed, else removed
            for current, write in writers.items():
                temp = stack.enter_context(replacing(current, suffix=image_suffix(current)))
                write(temp)
    except (OSError, RuntimeError) as exc:
        reason = _itk_reason(exc) if isinstance(exc, RuntimeError) else exc.strerror or one_line(exc)
        raise InputError(f"cannot write {current}: {reason.replace(str(temp), current.name)}") from exc


def _require_folder(target: Path) -> None:
    folder = target.parent
    if target.is_dir():
        raise InputError(f"cannot write {target}: it is a folder")
    if not folder.is_dir():
        reason = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"cannot write {target}: {folder} {reason}")
