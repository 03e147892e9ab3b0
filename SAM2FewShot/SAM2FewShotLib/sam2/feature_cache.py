"""Image-encoder features computed in batches, reused by every stage, in memory that does not grow.

Propagation, matching and retrieval all need the encoder's output for the same frames; the encoder
is by far the most expensive part of SAM2, so it runs once per frame, in batches, and its pooled
embedding is kept for every frame. Only a small window of full feature maps stays in memory: the
passes sweep the volume, so a larger in-memory cache would not be hit unless it held the whole
volume, and memory would grow with the slices. Evicted frames go to a scratch file on disk
(offload.py) and come back with a read instead of another encoder pass.

One request gives one result, whatever else was computed beside it: a frame's features must not
depend on the order frames were asked for, nor on whether they were encoded now, kept, offloaded or
read back from a file. So frame i is always encoded in its fixed group (frames i - i % B .. of B
frames, the last group padded with its last frame: every encoder call has the same shape), and every
feature map is kept in one memory layout (contiguous), the layout a file or the scratch gives back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch

from ..common.progress import ENCODE_QUERY, ProgressFn
from .frames import FrameSource, frames_per_batch
from .offload import DEFAULT_SPILL_BYTES, SpillFile


def pooled_embedding(backbone_out: dict) -> torch.Tensor:
    """(B, D) global average of the top-level encoder features: a cheap per-slice descriptor."""
    return backbone_out["vision_features"].float().mean(dim=(-2, -1))


DEFAULT_MEMORY_BYTES = 64 << 20  # in-memory window; at least two batches of frames are kept whatever it is


class FeatureCache:
    """Per-frame backbone outputs of one FrameSource, filled in batches: an LRU window in memory,
    the rest offloaded to disk (up to ``spill_bytes``; 0 disables it, beyond it frames are re-encoded)."""

    def __init__(
        self,
        predictor,
        frames: FrameSource,
        device: torch.device,
        batch_size: int | None = None,  # frames per encoder call (default: frames.frames_per_batch)
        max_bytes: int = DEFAULT_MEMORY_BYTES,
        storage_device: torch.device | None = None,
        spill_bytes: int = DEFAULT_SPILL_BYTES,
        stage: str = ENCODE_QUERY,
    ):
        self.predictor = predictor
        self.stage = stage  # what embed_all's progress calls its work
        self.frames = frames
        self.device = device
        self.storage_device = storage_device or device
        self.batch_size = max(1, int(batch_size or frames_per_batch(device)))
        self.max_bytes = int(max_bytes)
        self._features: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self._pos_enc: list[torch.Tensor] | None = None
        self._frame_bytes = 0
        self.spill = SpillFile(spill_bytes)
        self.embeddings: dict[int, torch.Tensor] = {}
        self.encoded_frames = 0  # how many frames went through the encoder (reuse shows here)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def capacity(self) -> int:
        if self._frame_bytes == 0:
            return self.batch_size
        return max(2 * self.batch_size, self.max_bytes // self._frame_bytes)

    @property
    def held_bytes(self) -> int:
        """Bytes of feature maps held in memory now (the offloaded ones are on disk)."""
        return len(self._features) * self._frame_bytes

    def close(self) -> None:
        """Free the in-memory features and the scratch file now rather than at garbage collection."""
        self._features.clear()
        self.spill.close()

    @property
    def complete(self) -> bool:
        """True when every frame is encoded and still held (in memory or offloaded): it can be saved."""
        return len(self.embeddings) == len(self.frames) and self._pos_enc is not None and all(
            i in self._features or i in self.spill for i in range(len(self.frames)))

    def save(self, path) -> bool:
        """Every frame's features into a file (feature_files.py), one frame at a time; False when the
        cache is not complete (frames re-encoded rather than kept) and nothing was written."""
        from .feature_files import write_features

        if not self.complete:
            return False
        frames = ((self._features[i] if i in self._features else self.spill.get(i), self.embeddings[i])
                  for i in range(len(self.frames)))
        write_features(Path(path), self._pos_enc, frames, len(self.frames))
        return True

    def restore(self, path) -> None:
        """The features a save wrote, for these same frames: nothing is encoded. FeatureFileError
        when the file does not fit (then the cache is left as it was)."""
        from .feature_files import read_features

        pos_enc, frames = read_features(Path(path), len(self.frames))
        self._pos_enc = [p.to(self.device) for p in pos_enc]
        for i, (fpn, embedding) in enumerate(frames):
            self.embeddings[i] = embedding
            self._keep(i, [f.to(self.storage_device) for f in fpn])

    def get(self, idx: int) -> dict:
        """The backbone output of one frame, batch dimension 1, as sam2's forward_image returns it."""
        if idx in self._features:
            self._features.move_to_end(idx)
        elif idx in self.spill:
            self._keep(idx, [f.to(self.storage_device, non_blocking=True) for f in self.spill.get(idx)])
        else:
            self._encode(self.group(idx))
        fpn = [f.to(self.device, non_blocking=True) for f in self._features[idx]]
        return {"backbone_fpn": fpn, "vision_pos_enc": list(self._pos_enc), "vision_features": fpn[-1]}

    def holds(self, idx: int) -> bool:
        """Whether frame ``idx`` is kept (in memory or offloaded): reading it back needs no encoder pass."""
        return idx in self._features or idx in self.spill

    def encode(self, idx: int) -> bool:
        """Encode frame ``idx`` (its group) unless it is kept; True when the encoder ran. A live session's
        background encoding fills the cache this way, one group at a time, without reading features back."""
        if self.holds(idx):
            return False
        self._encode(self.group(idx))
        return True

    def embed_all(self, indices: Iterable[int] | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
        """(N, D) pooled embeddings of the given frames (all by default), encoding only the missing ones."""
        idx = list(range(len(self.frames))) if indices is None else list(indices)
        todo = [i for i in idx if i not in self.embeddings]
        groups = sorted({i - i % self.batch_size for i in todo})
        for n, start in enumerate(groups):
            self._encode(self.group(start))
            if progress:
                progress(self.stage, n + 1, len(groups))
        return torch.stack([self.embeddings[i] for i in idx]) if idx else torch.zeros(0)

    def group(self, idx: int) -> list[int]:
        """The frames encoded together with frame ``idx``: always the same ones, whatever was asked first."""
        start = idx - idx % self.batch_size
        return list(range(start, min(start + self.batch_size, len(self.frames))))

    @torch.inference_mode()
    def _encode(self, indices: list[int]) -> None:
        from .devices import model_autocast

        padded = indices + indices[-1:] * (self.batch_size - len(indices))  # one shape for every call
        with model_autocast(self.predictor):  # at the model's precision: bf16 features stay bf16 (half the bytes)
            out = self.predictor.forward_image(self.frames.batch(padded, self.device))
        if self._pos_enc is None:  # positional encodings depend only on the image size
            self._pos_enc = [_own(p[:1]) for p in out["vision_pos_enc"]]
        pooled = pooled_embedding(out).cpu()
        for n, i in enumerate(indices):
            self.embeddings[i] = pooled[n].clone()
            self._keep(i, [_own(f[n : n + 1].to(self.storage_device)) for f in out["backbone_fpn"]])
        self.encoded_frames += len(indices)

    def _keep(self, idx: int, feats: list[torch.Tensor]) -> None:
        """Put a frame in the in-memory window; the least recently used ones move to disk."""
        if self._frame_bytes == 0:
            self._frame_bytes = sum(f.numel() * f.element_size() for f in feats)
        self._features[idx] = feats
        self._features.move_to_end(idx)
        while len(self._features) > self.capacity:
            old, old_feats = self._features.popitem(last=False)
            self.spill.put(old, old_feats)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy: the encoder returns strided views of its batch (channels last), and a layout
    that differed between kept and read-back features would change the kernels that use them."""
    return t.clone(memory_format=torch.contiguous_format)


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
        for cache, off in zip(reversed(self.caches), reversed(self.offsets), strict=True):
            if idx >= off:
                return cache, idx - off
        raise IndexError(idx)

    def get(self, idx: int) -> dict:
        cache, local = self._locate(idx)
        return cache.get(local)

    @property
    def encoded_frames(self) -> int:
        return sum(c.encoded_frames for c in self.caches)
