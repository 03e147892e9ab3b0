"""DINOv2 slice descriptors (small, base, large) through transformers, for library retrieval.

Weights are facebook/dinov2-* ``model.safetensors`` files fetched and checked by sam2/weights.py (same
cache, offline rule and SHA-256 rule as SAM2: no published hash is pinned, so the hub's own LFS
SHA-256 is checked on download and recorded for offline re-checks). The architecture is built
from the published config values below, so the one weights file is all that is downloaded, and
safetensors holds tensors only (nothing is unpickled).

Descriptor: the CLS token after the final layer norm (transformers' ``pooler_output``). DINOv2's
image-level DINO loss trains exactly this token as the global descriptor, and the paper's k-NN
and instance-retrieval results are computed on it; the mean of patch tokens is shaped by the
patch-level iBOT loss for dense tasks. ``pooling="mean"`` is there for comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common.errors import InputError, ModelError
from ..sam2 import models, weights
from ..sam2.frames import model_input
from .features import register_extractor

INPUT_SIZE = 224  # 16 x 16 patches of 14 px, DINOv2's training resolution for the global crops
POOLINGS = ("cls", "mean")
# hidden size, layers, heads: config.json of facebook/dinov2-small, -base, -large (all with
# mlp_ratio 4, patch 14, image_size 518, layerscale 1.0, layer_norm_eps 1e-6, GELU MLP).
VARIANTS: dict[str, tuple[int, int, int]] = {
    "dinov2-small": (384, 12, 6),
    "dinov2-base": (768, 12, 12),
    "dinov2-large": (1024, 24, 16),
}


def weight_spec(name: str) -> models.ModelSpec:
    """The weights file of a DINOv2 variant, described as sam2/weights.py describes SAM2 checkpoints."""
    _check_name(name)
    return models.ModelSpec(name, "DINOv2", "", f"facebook/{name}", "model.safetensors", None, INPUT_SIZE,
                            f"DINOv2 ViT-{name.split('-')[1][0].upper()}/14 slice descriptors for retrieval")


def dinov2_config(name: str, **overrides):
    """The published architecture of a variant; ``overrides`` (e.g. fewer layers) for tests only."""
    from transformers import Dinov2Config

    _check_name(name)
    hidden, layers, heads = VARIANTS[name]
    values = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                  patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu",
                  qkv_bias=True, use_swiglu_ffn=False)
    values.update(overrides)
    return Dinov2Config(**values)


def random_dinov2(name: str = "dinov2-small", seed: int = 0, **overrides) -> torch.nn.Module:
    """The real architecture with seeded random weights: tests and speed benchmarks only."""
    from transformers import Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(dinov2_config(name, **overrides)).eval()


def load_dinov2(name: str, offline: bool = False, progress=True) -> torch.nn.Module:
    """The pretrained model from the verified cache (downloaded first unless offline)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    from ..sam2.checkpoint import check_fits

    models.register_weights(weight_spec(name))
    path = weights.download(name, offline=offline, progress=progress)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    model = Dinov2Model(dinov2_config(name))
    check_fits(model.state_dict(), state, path.name)
    model.load_state_dict(state, strict=True)
    return model.eval()


class DINOv2Features:
    """(N, H, W) slices in [0, 1] -> (N, D) unit vectors: resized to 224, grey to RGB, ImageNet mean/std."""

    name = "dinov2"

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", batch_size: int = 16,
                 pooling: str = "cls", label: str = "dinov2", precision: str | None = None):
        from ..sam2.devices import resolve_precision

        if pooling not in POOLINGS:
            raise InputError(f"unknown DINOv2 pooling '{pooling}': use {' or '.join(POOLINGS)}")
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device).precision  # the default: bf16 where native
        self.model = model.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self.pooling = pooling
        self.label = label
        self._key: str | None = None

    @property
    def key(self) -> str:
        """What the vectors depend on, for the embedding index: variant, pooling, input, weights, precision."""
        if self._key is None:
            from ..sam2.checkpoint import weights_fingerprint

            self._key = f"{self.label}:{self.pooling}:{INPUT_SIZE}:{weights_fingerprint(self.model)}:{self.precision}"
        return self._key

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        from ..sam2.devices import autocast

        if images.ndim != 3:
            raise InputError(f"slices must be (N, H, W), got shape {tuple(images.shape)}")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = model_input(images[start : start + self.batch_size].to(self.device), INPUT_SIZE)
            with autocast(self.device, self.precision):
                hidden = self.model(pixel_values=x).last_hidden_state  # layer-normed, CLS first
            pooled = hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)
            out.append(pooled.float().cpu())
        dim = self.model.config.hidden_size
        return F.normalize(torch.cat(out), dim=1) if out else torch.zeros((0, dim))


def make_dinov2_features(name: str = "dinov2-small", model: torch.nn.Module | None = None, offline: bool = False,
                         progress=True, device: str | torch.device = "cpu", batch_size: int = 16,
                         pooling: str = "cls", random_weights: bool = False, seed: int = 0) -> DINOv2Features:
    """Features of a named variant: ``model`` as given, seeded random weights, or the pretrained ones."""
    _check_name(name)
    if model is None:
        model = random_dinov2(name, seed) if random_weights else load_dinov2(name, offline, progress)
    label = f"{name}-random" if random_weights else name
    return DINOv2Features(model, device, batch_size, pooling, label)


def _check_name(name: str) -> None:
    if name not in VARIANTS:
        raise InputError(f"unknown DINOv2 variant '{name}': use one of {', '.join(VARIANTS)}")


for _variant in VARIANTS:
    register_extractor(_variant, lambda _name=_variant, **kw: make_dinov2_features(_name, **kw))
