"""A volume seen as a SAM2 video: slicing axis, slice stack, and lazily built model-input frames.

A volume's frames are its own voxels, normalised when a batch is read (VolumeSlices): the volume is
the only copy, where a float32 stack of normalised slices would add 1 GB to a 512x512x1000 CT. The
resized, 3-channel, ImageNet-normalised tensors are made per batch on the model's device, so memory
does not grow with the model's image size or the slice count, and no file ever touches the disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..common.errors import InputError
from ..io.normalization import Normalization
from ..io.volume import Volume

# Frames the image encoder takes at once. On a GPU a batch of 4 pays; on a CPU it buys nothing from
# 256 px up (hiera-tiny, 2 threads, AMD EPYC: 198 ms per frame alone, 218 ms in fours at 256 px; 684 and
# 939 ms at 512 px) while its activations grow with it (0.44 GB a frame at 1024 px), so a CPU encodes
# one frame at a time: the features of a frame then never depend on which frames were encoded with it.
BATCH_FRAMES = 4


def frames_per_batch(device: torch.device | str) -> int:
    """How many frames the image encoder takes at once: 4 on a GPU, 1 on a CPU (see BATCH_FRAMES)."""
    return 1 if torch.device(device).type == "cpu" else BATCH_FRAMES


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VolumeSlices:
    """(N, H, W) float32 slices in [0, 1] of a volume along an axis, normalised when indexed.

    Indexing (an int, a slice, a list of ints) and iterating give tensors exactly equal to
    ``Normalization.slices``; only the slices asked for are ever made.
    """

    ndim = 3
    dtype = torch.float32

    def __init__(self, array: np.ndarray, axis: int, normalization: Normalization = Normalization()):
        self._norm = normalization.resolved(array)
        self._bounds = self._norm.volume_bounds(array)  # once: percentiles over the whole volume
        self._src = np.moveaxis(np.asarray(array), axis, 0)  # a view
        self.shape = torch.Size(self._src.shape)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, index) -> torch.Tensor:
        picked = self._src[index]
        single = picked.ndim == 2
        picked = picked[None] if single else picked
        out = np.empty(picked.shape, dtype=np.float32)
        self._norm.scale_into(picked, self._bounds, out)
        return torch.from_numpy(out[0] if single else out)

    def __iter__(self):
        return (self[t] for t in range(len(self)))

    def float(self) -> torch.Tensor:
        """Every slice, as one float32 tensor: a copy of the whole volume, for small ones only."""
        return self[:]


class FrameSource:
    """Normalised slices (N, H, W) in [0, 1] and the model input they become, per batch."""

    def __init__(self, slices01: torch.Tensor | np.ndarray | VolumeSlices, image_size: int):
        if isinstance(slices01, VolumeSlices):
            t = slices01
        else:
            t = (torch.as_tensor(np.asarray(slices01, dtype=np.float32)) if isinstance(slices01, np.ndarray)
                 else slices01)
            t = t.float().contiguous() if t.ndim == 3 else t
        if t.ndim != 3:
            raise InputError(f"frames must be (N, H, W), got shape {tuple(t.shape)}")
        self.slices01 = t
        self.image_size = int(image_size)

    @classmethod
    def from_volume(
        cls, volume: Volume, axis: int, image_size: int, normalization: Normalization = Normalization()
    ) -> FrameSource:
        return cls(VolumeSlices(volume.array, axis, normalization), image_size)

    @property
    def nbytes(self) -> int:
        """Memory the frames hold of their own (none when they are read from the volume)."""
        s = self.slices01
        return 0 if isinstance(s, VolumeSlices) else s.numel() * s.element_size()

    def __len__(self) -> int:
        return int(self.slices01.shape[0])

    @property
    def height(self) -> int:
        return int(self.slices01.shape[1])

    @property
    def width(self) -> int:
        return int(self.slices01.shape[2])

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
