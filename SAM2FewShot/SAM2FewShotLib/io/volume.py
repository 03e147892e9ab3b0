"""Voxel arrays that carry their geometry (origin, spacing, direction in LPS) everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..common.errors import InputError

Vec3 = tuple[float, float, float]
MAX_LABEL = 65535  # label maps are written as uint8 or uint16
Color = tuple[float, float, float]


@dataclass(frozen=True)
class Volume:
    """A 3D image: ``array`` is indexed (k, j, i) like SimpleITK's GetArrayFromImage.

    ``spacing`` and ``origin`` are in (i, j, k) order and LPS millimetres; ``direction`` is the
    row-major 3x3 matrix whose columns are the I, J, K axes in LPS, as ITK stores it.
    """

    array: np.ndarray
    spacing: Vec3
    origin: Vec3
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"expected a 3D volume, got {self.array.ndim}D array {self.array.shape}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in np.ravel(self.direction)))
        if len(self.direction) != 9 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise InputError("geometry must have 3 spacings, 3 origin values and a 3x3 direction")

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 homogeneous matrix from (i, j, k) voxel indices to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix from (i, j, k) to RAS, the convention of Slicer's IJKToRAS."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps()

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid with other voxels (shape must match)."""
        if array.shape != self.array.shape:
            raise InputError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return replace(self, array=array)

    def same_grid(self, other: Volume, tol: float = 1e-4) -> bool:
        """True when both volumes sample exactly the same points in space."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def require_same_grid(self, other: Volume, what: str = "labels", tol: float = 1e-4) -> None:
        """InputError naming each geometry field that differs, with both values (the ones that agree
        would only hide the one that does not)."""
        if self.same_grid(other, tol):
            return
        fields = [("shape", other.shape_ijk, self.shape_ijk, other.shape_ijk != self.shape_ijk)]
        fields += [(name, _fmt(theirs), _fmt(ours), not np.allclose(theirs, ours, atol=tol))
                   for name, theirs, ours in (("spacing", other.spacing, self.spacing),
                                              ("origin", other.origin, self.origin),
                                              ("direction", other.direction, self.direction))]
        differ = ", ".join(f"{name} {theirs} vs {ours}" for name, theirs, ours, different in fields if different)
        raise InputError(f"{what} and volume are on different grids: {differ}")

    def to_sitk(self):
        """The SimpleITK image with this geometry (imported lazily: the MRML bridge needs no ITK)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, img) -> Volume:
        import SimpleITK as sitk

        if img.GetDimension() != 3:
            raise InputError(f"expected a 3D image, got {img.GetDimension()}D")
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components per voxel"
            )
        return cls(
            array=sitk.GetArrayFromImage(img),
            spacing=img.GetSpacing(),
            origin=img.GetOrigin(),
            direction=img.GetDirection(),
        )


@dataclass(frozen=True)
class Segment:
    """One structure of a label map: its voxel value, name, display colour (0..1) and terminology."""

    value: int
    name: str
    color: Color = (0.5, 0.5, 0.5)
    terminology: str | None = None


@dataclass(frozen=True)
class LabelMap:
    """Integer labels on a grid, with the segments that name them."""

    volume: Volume
    segments: tuple[Segment, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.segments))
        names = [s.name for s in self.segments]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise InputError(f"segment names must be unique, repeated: {', '.join(sorted(dup))}")
        values = [s.value for s in self.segments]
        if len(set(values)) != len(values) or any(v <= 0 for v in values):
            raise InputError(f"segment values must be unique positive integers, got {values}")

    @property
    def values(self) -> list[int]:
        return [s.value for s in self.segments]

    def segment(self, value: int) -> Segment:
        for s in self.segments:
            if s.value == value:
                return s
        raise InputError(f"label value {value} does not exist (values: {self.values})")

    def with_array(self, array: np.ndarray, segments: Sequence[Segment] | None = None) -> LabelMap:
        return LabelMap(self.volume.with_array(array), tuple(self.segments if segments is None else segments))


# A colour table for labels that come without one (Slicer's GenericAnatomyColors-like, 0..1).
DEFAULT_COLORS: tuple[Color, ...] = (
    (0.50, 0.68, 0.50), (0.95, 0.84, 0.57), (0.69, 0.48, 0.40), (0.44, 0.72, 0.82),
    (0.85, 0.40, 0.35), (0.58, 0.45, 0.75), (0.90, 0.60, 0.20), (0.30, 0.55, 0.85),
    (0.86, 0.86, 0.40), (0.40, 0.80, 0.60), (0.80, 0.45, 0.65), (0.55, 0.55, 0.55),
)


def default_segments(values: Sequence[int]) -> tuple[Segment, ...]:
    """Segments named ``label_N`` with distinct colours, for label files without metadata."""
    return tuple(
        Segment(int(v), f"label_{int(v)}", DEFAULT_COLORS[(int(v) - 1) % len(DEFAULT_COLORS)])
        for v in values
    )


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


@dataclass(frozen=True)
class SupportCase:
    """A labelled case: an image, its labels on the image's grid, and the files they came from, so that
    an error about a support names its file. Unpacks as ``image, labels``."""

    image: Volume
    labels: LabelMap
    files: tuple[str, str] | None = None  # (image, labels) paths, when read from files
    index: int = 0  # its place among the request's supports, from 0

    @property
    def name(self) -> str:
        """'support 2', with its label file when known."""
        return f"support {self.index + 1}" + (f" (labels {self.files[1]})" if self.files else "")

    def __iter__(self):
        return iter((self.image, self.labels))

    @classmethod
    def listed(cls, supports: Sequence) -> list[SupportCase]:
        """Supports numbered in order; (image, labels) pairs (callers in code and tests) become cases."""
        out = []
        for n, s in enumerate(supports):
            out.append(replace(s, index=n) if isinstance(s, SupportCase) else cls(s[0], s[1], index=n))
        return out


def voxel_counts(labels: np.ndarray, top: int) -> np.ndarray:
    """Voxels of each label value 0..top, a slice at a time: np.bincount of a whole volume would
    first make an int64 copy of it (2 GB for a 512x512x1000 label map)."""
    counts = np.zeros(top + 1, dtype=np.int64)
    for section in labels if labels.ndim > 2 else [labels]:  # a (strided) view per slice, never a reshaped copy
        counts += np.bincount(section.ravel(), minlength=top + 1)[:top + 1]
    return counts
