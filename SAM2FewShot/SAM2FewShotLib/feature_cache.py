"""Image-encoder features computed in batches, kept within a memory budget, reused by every stage.

Propagation, matching and retrieval all need the encoder's output for the same frames; the encoder
is by far the most expensive part of SAM2, so it runs once per frame, in batches, and its pooled
embedding is kept for every frame even after the full feature maps are evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

import torch

from .frames import FrameSource

from .progress import ProgressFn  # noqa: F401 (re-exported)


def pooled_embedding(backbone_out: dict) -> torch.Tensor:
    """(B, D) global average of the top-level encoder features: a cheap per-slice descriptor."""
    return backbone_out["vision_features"].float().mean(dim=(-2, -1))


class FeatureCache:
    """LRU cache of per-frame backbone outputs of one FrameSource, filled in batches."""

    def __init__(
        self,
        predictor,
        frames: FrameSource,
        device: torch.device,
        batch_size: int = 4,
        max_bytes: int = 2 << 30,
        storage_device: Optional[torch.device] = None,
    ):
        self.predictor = predictor
        self.frames = frames
        self.device = device
        self.storage_device = storage_device or device
        self.batch_size = max(1, int(batch_size))
        self.max_bytes = int(max_bytes)
        self.direction = 1  # which way to prefetch: +1 forward, -1 backward
        self._features: "OrderedDict[int, list[torch.Tensor]]" = OrderedDict()
        self._pos_enc: Optional[list[torch.Tensor]] = None
        self._frame_bytes = 0
        self.embeddings: dict[int, torch.Tensor] = {}
        self.encoded_frames = 0  # how many frames went through the encoder (reuse shows here)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def capacity(self) -> int:
        if self._frame_bytes == 0:
            return self.batch_size
        return max(2 * self.batch_size, self.max_bytes // self._frame_bytes)

    def get(self, idx: int) -> dict:
        """The backbone output of one frame, batch dimension 1, as sam2's forward_image returns it."""
        if idx not in self._features:
            self._encode(self._batch_from(idx))
        self._features.move_to_end(idx)
        fpn = [f.to(self.device, non_blocking=True) for f in self._features[idx]]
        return {"backbone_fpn": fpn, "vision_pos_enc": list(self._pos_enc), "vision_features": fpn[-1]}

    def embed_all(self, indices: Optional[Iterable[int]] = None, progress: Optional[ProgressFn] = None) -> torch.Tensor:
        """(N, D) pooled embeddings of the given frames (all by default), encoding only the missing ones."""
        idx = list(range(len(self.frames))) if indices is None else list(indices)
        todo = [i for i in idx if i not in self.embeddings]
        for start in range(0, len(todo), self.batch_size):
            self._encode(todo[start : start + self.batch_size])
            if progress:
                progress("encode", min(start + self.batch_size, len(todo)), len(todo))
        return torch.stack([self.embeddings[i] for i in idx]) if idx else torch.zeros(0)

    def _batch_from(self, idx: int) -> list[int]:
        """The next frames in the prefetch direction that are not cached yet, starting at idx."""
        out, i = [], idx
        while len(out) < self.batch_size and 0 <= i < len(self.frames):
            if i == idx or i not in self._features:
                out.append(i)
            i += self.direction
        return out

    @torch.inference_mode()
    def _encode(self, indices: list[int]) -> None:
        from .devices import autocast

        with autocast(self.device):
            out = self.predictor.forward_image(self.frames.batch(indices, self.device))
        if self._pos_enc is None:  # positional encodings depend only on the image size
            self._pos_enc = [p[:1].clone() for p in out["vision_pos_enc"]]
        pooled = pooled_embedding(out).cpu()
        for n, i in enumerate(indices):
            feats = [f[n : n + 1].to(self.storage_device).clone() for f in out["backbone_fpn"]]
            self._features[i] = feats
            self._features.move_to_end(i)
            self.embeddings[i] = pooled[n]
            if self._frame_bytes == 0:
                self._frame_bytes = sum(f.numel() * f.element_size() for f in feats)
        self.encoded_frames += len(indices)
        while len(self._features) > self.capacity:
            self._features.popitem(last=False)


class StackedCache:
    """Several caches seen as one video: the query's frames, then support frames after them.

    Support images enter SAM2 as extra frames of the same inference state, so the query's warm
    cache is reused as it is and the supports' features are computed once, in batches, too.
    """

    def __init__(self, caches: list[FeatureCache]):
        self.caches = caches
        self.offsets = []
        total = 0
        for c in caches:
            self.offsets.append(total)
            total += len(c)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def _locate(self, idx: int) -> tuple[FeatureCache, int]:
        for cache, off in zip(reversed(self.caches), reversed(self.offsets)):
            if idx >= off:
                return cache, idx - off
        raise IndexError(idx)

    def get(self, idx: int) -> dict:
        cache, local = self._locate(idx)
        return cache.get(local)

    @property
    def direction(self) -> int:
        return self.caches[0].direction

    @direction.setter
    def direction(self, value: int) -> None:
        self.caches[0].direction = value

    @property
    def encoded_frames(self) -> int:
        return sum(c.encoded_frames for c in self.caches)
