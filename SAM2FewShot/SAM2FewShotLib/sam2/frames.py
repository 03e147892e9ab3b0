"""A volume seen as a SAM2 video: slicing axis, slice stack, and lazily built model-input frames.

Frames are kept once, as normalised slices at native resolution on the CPU; the resized,
3-channel, ImageNet-normalised tensors are made per batch on the model's device, so memory
does not grow with the model's image size and no file ever touches the disk.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..common.errors import InputError
from ..io.normalization import Normalization
from ..io.volume import Volume

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrameSource:
    """Normalised slices (N, H, W) in [0, 1] and the model input they become, per batch."""

    def __init__(self, slices01: torch.Tensor | np.ndarray, image_size: int):
        t = torch.as_tensor(np.asarray(slices01, dtype=np.float32)) if isinstance(slices01, np.ndarray) else slices01
        if t.ndim != 3:
            raise InputError(f"frames must be (N, H, W), got shape {tuple(t.shape)}")
        self.slices01 = t.float().contiguous()
        self.image_size = int(image_size)

    @classmethod
    def from_volume(
        cls, volume: Volume, axis: int, image_size: int, normalization: Normalization = Normalization()
    ) -> "FrameSource":
        return cls(normalization.slices(volume.array, axis), image_size)

    def __len__(self) -> int:
        return int(self.slices01.shape[0])

    @property
    def height(self) -> int:
        return int(self.slices01.shape[1])

    @property
    def width(self) -> int:
        return int(self.slices01.shape[2])

    def concat(self, other: "FrameSource") -> "FrameSource":
        """This video followed by ``other``'s frames (resized to our slice size if needed)."""
        extra = other.slices01
        if extra.shape[1:] != self.slices01.shape[1:]:
            extra = resize(extra, (self.height, self.width))
        return FrameSource(torch.cat([self.slices01, extra.float()]), self.image_size)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, 3, S, S) float32 model input: resized, 3 channels, ImageNet-normalised."""
        x = self.slices01[list(indices)].to(device, non_blocking=True)
        return model_input(x, self.image_size)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, H, W), antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[:, 0]


def model_input(slices01: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, H, W) in [0, 1] -> (N, 3, S, S) as SAM2 expects (square resize, ImageNet mean/std)."""
    x = resize(slices01.float(), (image_size, image_size)).clamp_(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x[:, None].expand(-1, 3, -1, -1) - mean) / std
