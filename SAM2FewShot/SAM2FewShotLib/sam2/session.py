"""A query volume prepared for the model once: slicing axis, frames and the encoder-feature cache.

The worker keeps sessions warm between runs, so re-propagating after an edit (or trying another
method on the same volume) does not encode the volume again.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..common.progress import ENCODE_SUPPORTS
from ..io.normalization import Normalization
from ..io.slicing import from_slices, slicing_axis, to_slices
from ..io.volume import LabelMap, Volume
from .feature_cache import DEFAULT_MEMORY_BYTES, FeatureCache
from .frames import FrameSource
from .offload import DEFAULT_SPILL_BYTES

AXIS_NAMES = {0: "k", 1: "j", 2: "i"}


class VolumeSession:
    """One volume, one axis, one normalisation, one model: frames and cached features."""

    def __init__(
        self,
        predictor,
        volume: Volume,
        axis: str | int = "auto",
        normalization: Normalization = Normalization(),
        batch_size: int = 4,
        feature_budget_bytes: int = DEFAULT_MEMORY_BYTES,
        spill_bytes: int = DEFAULT_SPILL_BYTES,
    ):
        self.predictor = predictor
        self.volume = volume
        self.axis = axis if isinstance(axis, int) else slicing_axis(volume, axis)
        self.normalization = normalization.resolved(volume.array)
        self.frames = FrameSource.from_volume(volume, self.axis, predictor.image_size, self.normalization)
        self.spill_bytes = spill_bytes  # each cache's own file may shrink it (free space, a full disk)
        self.cache = FeatureCache(predictor, self.frames, predictor.device, batch_size=batch_size,
                                  max_bytes=feature_budget_bytes, spill_bytes=spill_bytes)
        self.support_caches: "OrderedDict[str, FeatureCache]" = OrderedDict()  # by support content

    def support_cache(self, key: str, frames: FrameSource, keep: int = 2) -> FeatureCache:
        """Encoder features of support frames, kept for the next run with the same supports."""
        if key not in self.support_caches:
            self.support_caches[key] = FeatureCache(self.predictor, frames, self.predictor.device,
                                                    batch_size=self.cache.batch_size, max_bytes=self.cache.max_bytes,
                                                    spill_bytes=self.spill_bytes, stage=ENCODE_SUPPORTS)
            while len(self.support_caches) > keep:
                self.support_caches.popitem(last=False)[1].close()
        self.support_caches.move_to_end(key)
        return self.support_caches[key]

    def drop_supports(self) -> None:
        """Forget the supports' features (the next run encodes its supports again)."""
        for cache in self.support_caches.values():
            cache.close()
        self.support_caches.clear()

    def close(self) -> None:
        """Release the features (memory and scratch file) of the volume and its supports."""
        self.cache.close()
        self.drop_supports()

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
