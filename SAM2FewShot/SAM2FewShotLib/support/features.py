"""Slice descriptors and their similarity, for matching query slices to support slices.

Every extractor maps (N, H, W) slices in [0, 1] to (N, D) unit vectors, so similarity is always
a dot product (cosine) whatever the features: SAM2's own encoder (free, it runs for propagation
anyway), plain intensities (NCC, CPU-quick), or others registered later (DINOv2 for retrieval).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..common.errors import InputError
from ..io.normalization import CHUNK_VOXELS
from ..sam2.feature_cache import pooled_embedding
from ..sam2.frames import frames_per_batch, model_input

EmbedFn = Callable[[torch.Tensor], torch.Tensor]

# (B, D) global average over H, W of the encoder's top-level features ("vision_features").
pool_sam2_features = pooled_embedding


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W) in [0, 1] -> (N, D) float32, each row of unit length (or zero if featureless)."""
        ...


class IntensityFeatures:
    """Downsampled intensities, standardised per slice: cosine similarity of these IS the NCC.

    After subtracting each slice's mean and scaling to unit length, the dot product of two vectors
    is sum((a - mean_a)(b - mean_b)) / (|a - mean_a| |b - mean_b|): normalised cross-correlation
    (Pearson correlation) of the two downsampled slices, insensitive to brightness and contrast.
    A constant slice has no structure to correlate and gets the zero vector (similarity 0 to all).
    """

    name = "intensity"

    def __init__(self, size: int = 32):
        if size < 2:
            raise InputError(f"intensity feature size must be at least 2, got {size}")
        self.size = int(size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        _check_slices(images)
        step = max(1, CHUNK_VOXELS // max(1, images.shape[1] * images.shape[2]))  # never a float copy of all
        x = torch.cat([F.interpolate(images[i:i + step].float()[:, None], size=(self.size, self.size), mode="area")
                       for i in range(0, len(images), step)] or [torch.zeros((0, 1, self.size, self.size))])
        x = x.flatten(1)
        x = x - x.mean(dim=1, keepdim=True)
        # unit length (unit variance up to a constant): below a rounding-level spread, a blank slice
        norm = x.norm(dim=1, keepdim=True)
        return torch.where(norm > 1e-5 * x.shape[1] ** 0.5, x / norm.clamp_min(1e-12), torch.zeros_like(x))


class SAM2Features:
    """Pooled SAM2 image-encoder features, L2-normalised.

    ``embed_fn`` returns the pooled encoder embedding of (N, H, W) slices in [0, 1]: the feature
    cache's, so query frames are encoded once for matching and propagation alike.
    """

    name = "sam2"

    def __init__(self, embed_fn: EmbedFn):
        self.embed_fn = embed_fn

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        _check_slices(images)
        return F.normalize(self.embed_fn(images).float(), dim=1)


def sam2_embed_fn(predictor, device: torch.device | str = "cpu", batch_size: int | None = None) -> EmbedFn:
    """An embed_fn running the predictor's image encoder in batches (default: as the feature cache
    does, sam2/frames.frames_per_batch), for slices no cache holds.

    Only the pooled vector of each slice is kept, so library-sized sets fit in memory.
    """
    from ..sam2.devices import model_autocast

    device = torch.device(device)
    batch_size = batch_size or frames_per_batch(device)

    @torch.inference_mode()
    def embed(images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = model_input(images[start : start + batch_size].to(device), predictor.image_size)
            with model_autocast(predictor):  # the model's --precision
                out.append(pool_sam2_features(predictor.forward_image(x)).cpu())
        return torch.cat(out)

    return embed


def cosine_matrix(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(Nq, Ns) cosine similarities; rows are normalised here too, so raw features work."""
    if q.ndim != 2 or s.ndim != 2 or q.shape[1] != s.shape[1]:
        raise InputError(f"embeddings must be (N, D) with the same D, got {tuple(q.shape)} and {tuple(s.shape)}")
    return F.normalize(q.float(), dim=1) @ F.normalize(s.float(), dim=1).T


_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {}


def register_extractor(name: str, factory: Callable[..., FeatureExtractor]) -> None:
    """Make ``make_extractor(name, **kw)`` build extractors with ``factory(**kw)``."""
    _REGISTRY[name.lower()] = factory


def make_extractor(name: str, **kw) -> FeatureExtractor:
    """'intensity' (size=32) or 'sam2' (embed_fn=..., or predictor=... [device, batch_size])."""
    factory = _REGISTRY.get((name or "").lower())
    if factory is None:
        raise InputError(f"unknown features '{name}': use one of {', '.join(sorted(_REGISTRY))}")
    return factory(**kw)


def _make_sam2(embed_fn: EmbedFn | None = None, predictor=None, **kw) -> SAM2Features:
    if embed_fn is None:
        if predictor is None:
            raise InputError("sam2 features need the SAM2 model (predictor) or an embed_fn")
        embed_fn = sam2_embed_fn(predictor, **kw)
    return SAM2Features(embed_fn)


def _check_slices(images: torch.Tensor) -> None:
    if images.ndim != 3:
        raise InputError(f"slices must be (N, H, W), got shape {tuple(images.shape)}")


register_extractor("intensity", IntensityFeatures)
register_extractor("sam2", _make_sam2)
