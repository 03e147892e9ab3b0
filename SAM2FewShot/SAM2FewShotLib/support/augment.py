"""Augmented copies of support slices: one random affine on image and mask, intensity jitter on the image.

More looks of the same labelled slice give matching a better chance of finding one that resembles a
query slice (a rotated organ, another scanner's contrast). Image and mask are resampled through the
same grid, so the label stays on the anatomy it marks. Copy 0 of every slice is the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..common.errors import InputError


@dataclass(frozen=True)
class AugmentParams:
    """Ranges to draw from (uniformly): ± for symmetric ones, (low, high) for factors."""

    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    shear_deg: float = 5.0
    translate: float = 0.08  # fraction of the slice's width / height
    brightness: float = 0.1  # added, in [0, 1] intensity units
    contrast: tuple[float, float] = (0.85, 1.15)  # about the slice's mean
    gamma: tuple[float, float] = (0.8, 1.25)  # drawn log-uniformly, so darker and brighter are equally likely
    noise_sigma: float = 0.02  # the Gaussian noise sigma is drawn from [0, noise_sigma]


@dataclass(frozen=True)
class CopyParams:
    """What was done to one copy, for the report: the forward transform from original to copy."""

    angle: float  # degrees, turning x (column) towards y (row)
    scale: float
    shear: float  # degrees
    tx: float  # fraction of the width
    ty: float  # fraction of the height
    brightness: float
    contrast: float
    gamma: float
    noise: float  # sigma of the added noise

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass
class Augmented:
    """``copies`` copies per source slice, source-major: output n * copies + c is copy c of slice n."""

    images: torch.Tensor  # (N * copies, H, W) float32 in [0, 1]
    masks: torch.Tensor  # (N * copies, H, W) bool
    params: list[CopyParams]
    source: torch.Tensor  # (N * copies,) index of the source slice
    copy: torch.Tensor  # (N * copies,) copy number, 0 = the original


def augment_slices(
    images: torch.Tensor,
    masks: torch.Tensor,
    copies: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    params: AugmentParams | None = None,
) -> Augmented:
    """``copies`` versions of each (image, mask) pair, the first unchanged; same seed, same copies."""
    if images.ndim != 3 or masks.shape != images.shape:
        raise InputError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} must both be (N, H, W)")
    if copies < 1:
        raise InputError(f"the number of copies must be at least 1, got {copies}")
    p = params or AugmentParams()
    device = torch.device(device)
    n, h, w = images.shape
    total = n * copies
    source = torch.arange(n).repeat_interleave(copies)
    copy = torch.arange(copies).repeat(n)
    draws = _draw(p, total, seed)
    draws[copy == 0] = _IDENTITY  # copy 0: the original, untouched

    img = images.to(device, torch.float32)[source.to(device)]
    msk = masks.to(device).bool()[source.to(device)]
    out_img, out_msk = img.clone(), msk.clone()
    moved = (copy > 0).to(device)
    if bool(moved.any()):
        theta = _sampling_theta(draws[copy > 0, :5], h, w).to(device)
        grid = F.affine_grid(theta, [int(moved.sum()), 1, h, w], align_corners=False)
        warped = F.grid_sample(img[moved][:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        warped_m = F.grid_sample(msk[moved][:, None].float(), grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)
        jittered = _jitter(warped[:, 0], draws[copy > 0, 5:].to(device), seed)
        out_img[moved] = jittered
        out_msk[moved] = warped_m[:, 0] >= 0.5
    return Augmented(
        images=out_img,
        masks=out_msk,
        params=[CopyParams(*(float(v) for v in row)) for row in draws.tolist()],
        source=source,
        copy=copy,
    )


# angle, scale, shear, tx, ty, brightness, contrast, gamma, noise sigma
_IDENTITY = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)


def _draw(p: AugmentParams, total: int, seed: int) -> torch.Tensor:
    """(total, 9) parameters, drawn on the CPU so the same seed gives the same copies on any device."""
    g = torch.Generator().manual_seed(int(seed))

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(total, generator=g, dtype=torch.float64)

    log_gamma = uniform(math.log(p.gamma[0]), math.log(p.gamma[1]))
    return torch.stack(
        [
            uniform(-p.rotation_deg, p.rotation_deg),
            uniform(*p.scale),
            uniform(-p.shear_deg, p.shear_deg),
            uniform(-p.translate, p.translate),
            uniform(-p.translate, p.translate),
            uniform(-p.brightness, p.brightness),
            uniform(*p.contrast),
            log_gamma.exp(),
            uniform(0.0, p.noise_sigma),
        ],
        dim=1,
    )


def _sampling_theta(geo: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 2, 3) affine_grid matrices: for each output pixel, where to sample the input.

    The forward transform (rotate, shear, scale about the centre, then translate) is built in
    pixel units so rotations stay rotations on non-square slices, then inverted and expressed in
    affine_grid's normalised [-1, 1] coordinates.
    """
    angle, scale, shear, tx, ty = (geo[:, i] for i in range(5))
    a, s = torch.deg2rad(angle), torch.deg2rad(shear)
    b = geo.shape[0]
    rot = torch.zeros(b, 3, 3, dtype=torch.float64)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    rot[:, 2, 2] = 1.0
    shear_m = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
    shear_m[:, 0, 1] = s.tan()
    forward = rot @ shear_m
    forward[:, :2, :2] *= scale[:, None, None]
    forward[:, 0, 2], forward[:, 1, 2] = tx * w, ty * h
    half = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], dtype=torch.float64))
    to_norm = torch.linalg.inv(half)
    theta = to_norm @ torch.linalg.inv(forward) @ half
    return theta[:, :2, :].float()


def _jitter(images: torch.Tensor, draws: torch.Tensor, seed: int) -> torch.Tensor:
    """Gamma, then contrast about the mean and brightness, then noise; kept in [0, 1]."""
    brightness, contrast, gamma, sigma = (draws[:, i].float()[:, None, None] for i in range(4))
    x = images.clamp(0.0, 1.0).pow(gamma)
    mean = x.mean(dim=(1, 2), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    g = torch.Generator(device=images.device).manual_seed(int(seed) + 1)
    noise = torch.randn(images.shape, generator=g, device=images.device, dtype=images.dtype)
    return (x + sigma * noise).clamp_(0.0, 1.0)
