"""Model-input intensity normalisation: CT windows by name, custom windows, MR percentiles.

Only the copy that feeds the model is normalised; the user's voxels are never changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..common.errors import InputError

# (centre, width) in HU; the usual radiology presets.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (50.0, 400.0),
    "soft_tissue": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "head_neck": (60.0, 350.0),
}


@dataclass(frozen=True)
class Normalization:
    """How to map a volume's intensities to [0, 1] for the model.

    mode: "auto" (a CT window when the volume looks like CT, else percentiles), "window" (centre and
    width, from a preset or given), or "percentile" (clip at low/high percentiles, for MR).
    per_slice: compute percentiles on each slice instead of the whole volume.
    """

    mode: str = "auto"
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    per_slice: bool = False

    @classmethod
    def parse(cls, text: str, per_slice: bool = False) -> Normalization:
        """'auto', a CT preset name ('abdomen', 'lung', ...), 'window:CENTRE,WIDTH', 'percentile[:LO,HI]'."""
        text = (text or "auto").strip().lower()
        try:
            if text == "auto":
                return cls("auto", per_slice=per_slice)
            if text in CT_PRESETS:
                return cls("window", CT_PRESETS[text], per_slice=per_slice)
            if text.startswith("window:"):
                c, w = (float(x) for x in text.split(":", 1)[1].split(","))
                if w <= 0:
                    raise ValueError
                return cls("window", (c, w), per_slice=per_slice)
            if text.startswith("percentile") or text in ("mr", "mri"):
                lo, hi = 0.5, 99.5
                if ":" in text:
                    lo, hi = (float(x) for x in text.split(":", 1)[1].split(","))
                if not 0 <= lo < hi <= 100:
                    raise ValueError
                return cls("percentile", percentiles=(lo, hi), per_slice=per_slice)
        except ValueError:
            pass
        raise InputError(
            f"unknown normalisation '{text}': use auto, a CT preset ({', '.join(CT_PRESETS)}), "
            "window:CENTRE,WIDTH or percentile:LOW,HIGH"
        )

    def resolved(self, array: np.ndarray) -> Normalization:
        """Auto picks the abdomen window for CT-like volumes (air near -1000 HU), else percentiles."""
        if self.mode != "auto":
            return self
        looks_ct = np.issubdtype(array.dtype, np.number) and float(np.min(array)) <= -900.0
        if looks_ct:
            return Normalization("window", CT_PRESETS["abdomen"], self.percentiles, self.per_slice)
        return Normalization("percentile", None, self.percentiles, self.per_slice)

    def apply(self, array: np.ndarray, axis: int = 0) -> np.ndarray:
        """float32 in [0, 1], laid out like ``array``; with per_slice, percentiles are taken per slice
        along ``axis``. (A view of ``slices``' result: moving ``axis`` first again costs no copy.)"""
        return np.moveaxis(self.slices(array, axis), 0, axis)

    def slices(self, array: np.ndarray, axis: int = 0) -> np.ndarray:
        """(N, H, W) contiguous float32 in [0, 1] with ``axis`` first, made in one buffer a few slices
        at a time, so no temporary copy of the volume is ever made."""
        norm = self.resolved(array)
        bounds = norm.volume_bounds(array)
        src = np.moveaxis(np.asarray(array), axis, 0)
        out = np.empty(src.shape, dtype=np.float32)
        step = max(1, CHUNK_VOXELS // max(1, int(np.prod(src.shape[1:]))))
        for start in range(0, len(src), step):
            norm.scale_into(src[start:start + step], bounds, out[start:start + step])
        return out

    def volume_bounds(self, array: np.ndarray) -> tuple[float, float] | None:
        """The intensities that become 0 and 1 for the whole volume; None when each slice has its own."""
        norm = self.resolved(array)
        if norm.mode == "window":
            c, w = norm.window
            return c - w / 2.0, c + w / 2.0
        return None if norm.per_slice else _percentiles(np.asarray(array), norm.percentiles)

    def scale_into(self, slices: np.ndarray, bounds: tuple[float, float] | None, out: np.ndarray) -> None:
        """Some (n, H, W) slices into ``out`` (float32, in [0, 1]) with ``volume_bounds``' result; on a
        resolved normalisation, as bounds of None mean each slice's own percentiles."""
        if bounds is not None:
            _scale_into(slices, bounds, out)
            return
        for t in range(len(slices)):
            _scale_into(slices[t], _percentiles(slices[t], self.percentiles), out[t])


CHUNK_VOXELS = 1 << 22  # voxels normalised per step: bounds the float temporaries
PERCENTILE_SAMPLES = 1 << 24  # beyond this many voxels, percentiles come from a regular subsample


def _percentiles(data: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Low and high percentiles; a large volume is subsampled with an odd stride (which cannot
    alias with power-of-two rows) so that no copy of the whole volume is made."""
    flat = data.reshape(-1)
    stride = -(-flat.size // PERCENTILE_SAMPLES)
    if stride > 1:
        flat = flat[:: stride | 1]
    lo, hi = np.percentile(flat, percentiles)
    return float(lo), float(hi)


def _scale_into(src: np.ndarray, bounds: tuple[float, float], out: np.ndarray) -> None:
    """out = clip((src - lo) / (hi - lo), 0, 1) in float32, in place; all zeros for a flat range."""
    lo, hi = bounds
    if hi <= lo:
        out[...] = 0.0
        return
    np.subtract(src, np.float32(lo), out=out, dtype=np.float32, casting="unsafe")
    np.divide(out, np.float32(hi - lo), out=out)
    np.clip(out, 0.0, 1.0, out=out)
