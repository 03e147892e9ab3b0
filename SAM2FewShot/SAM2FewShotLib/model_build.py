"""Building the real SAM2 video predictor from sam2's own configs, at any image size."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .errors import ModelError

# Our predictor subclass: batched, cached image features and in-memory frames (sam2_core).
PREDICTOR_TARGET = "SAM2FewShotLib.sam2_core.VolumePredictor"


def size_overrides(image_size: int) -> list[str]:
    """Hydra overrides for a non-default input size: RoPE attention grids follow image_size/16."""
    if image_size % 64 != 0 or image_size < 128:
        raise ModelError(f"image size must be a multiple of 64 and at least 128, got {image_size}")
    g = image_size // 16
    return [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{g},{g}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{g},{g}]",
    ]


def build_video_predictor(
    config: str,
    checkpoint: Optional[Path] = None,
    device: str | torch.device = "cpu",
    image_size: Optional[int] = None,
    seed: Optional[int] = None,
):
    """The sam2 video predictor (our subclass) from a sam2 config name, with optional weights.

    Without a checkpoint the weights are sam2's random initialisation, seeded when ``seed`` is given:
    that is how the tests run the real architecture where no weights can be downloaded.
    """
    from sam2.build_sam import build_sam2_video_predictor

    overrides = [f"++model._target_={PREDICTOR_TARGET}"]
    if image_size is not None:
        overrides += size_overrides(int(image_size))
    if seed is not None:
        torch.manual_seed(seed)
    try:
        predictor = build_sam2_video_predictor(
            config, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides
        )
    except Exception as exc:  # hydra wraps the real cause (bad config name, out of memory, ...)
        root = exc
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        reason = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        raise ModelError(f"cannot build SAM2 from config '{config}': {reason}") from exc
    # fill_hole_area needs sam2's CUDA extension, which our installs do not build: without it sam2
    # warns and skips the step on every run, so it is switched off explicitly.
    predictor.fill_hole_area = 0
    if checkpoint is not None:
        from .checkpoint import load_state_dict

        load_state_dict(predictor, Path(checkpoint))
    return predictor.to(device).eval()
