"""A query volume prepared for the model once: slicing axis, frames and the encoder-feature cache.

The worker keeps sessions warm between runs, so re-propagating after an edit (or trying another
method on the same volume) does not encode the volume again.
"""

from __future__ import annotations

import numpy as np

from ..io.normalization import Normalization
from ..io.slicing import from_slices, slicing_axis, to_slices
from ..io.volume import LabelMap, Volume
from .feature_cache import DEFAULT_MEMORY_BYTES, FeatureCache
from .frames import FrameSource, frames_per_batch
from .offload import DEFAULT_SPILL_BYTES
from .support_store import SupportFeatureStore

AXIS_NAMES = {0: "k", 1: "j", 2: "i"}


class VolumeSession:
    """One volume, one axis, one normalisation, one model: frames and cached features."""

    def __init__(
        self,
        predictor,
        volume: Volume,
        axis: str | int = "auto",
        normalization: Normalization = Normalization(),
        batch_size: int | None = None,  # frames per encoder batch (default: frames.frames_per_batch)
        feature_budget_bytes: int = DEFAULT_MEMORY_BYTES,
        spill_bytes: int = DEFAULT_SPILL_BYTES,
        supports: SupportFeatureStore | None = None,
    ):
        self.predictor = predictor
        self.volume = volume
        self.axis = axis if isinstance(axis, int) else slicing_axis(volume, axis)
        self.normalization = normalization.resolved(volume.array)
        self.frames = FrameSource.from_volume(volume, self.axis, predictor.image_size, self.normalization)
        batch_size = batch_size or frames_per_batch(predictor.device)
        self.cache = FeatureCache(predictor, self.frames, predictor.device, batch_size=batch_size,
                                  max_bytes=feature_budget_bytes, spill_bytes=spill_bytes)
        self._own_supports = supports is None  # a store of its own, or one shared by the runner's sessions
        self.supports = supports or SupportFeatureStore(predictor, batch_size=batch_size,
                                                        max_bytes=feature_budget_bytes, spill_bytes=spill_bytes)

    def support_cache(self, key: str, frames: FrameSource) -> FeatureCache:
        """Encoder features of support frames, kept for the next run (and query) with the same supports."""
        return self.supports.cache(key, frames)

    def close(self) -> None:
        """Release the volume's features (memory and scratch file), and the supports' when they are its own."""
        self.cache.close()
        if self._own_supports:
            self.supports.close()

    @property
    def num_slices(self) -> int:
        return len(self.frames)

    def slices_of(self, array: np.ndarray) -> np.ndarray:
        """(N, H, W) view of a (k, j, i) array along this session's axis."""
        return to_slices(array, self.axis)

    def to_labelmap(self, slice_labels: np.ndarray, segments) -> LabelMap:
        """Slice-ordered labels back onto the volume's exact grid."""
        arr = from_slices(slice_labels, self.axis)
        dtype = np.uint8 if arr.max(initial=0) < 256 else np.uint16
        return LabelMap(self.volume.with_array(arr.astype(dtype, copy=False)), tuple(segments))

    def describe(self) -> dict:
        norm = self.normalization
        return {
            "axis": AXIS_NAMES[self.axis],
            "num_slices": self.num_slices,
            "slice_shape": [self.frames.height, self.frames.width],
            "normalization": {"mode": norm.mode, "window": norm.window, "percentiles": list(norm.percentiles),
                              "per_slice": norm.per_slice},
            "image_size": self.frames.image_size,
        }
