"""Loading a model: the real SAM2 video predictor from sam2's own configs, at any image size, with
registered, local or random weights. Every front end describes its model as ``ModelOptions`` and
loads it through ``load_model``.

torch is imported when a model is built, not with this module: requests carry ModelOptions, and
the Slicer panel builds requests before torch is installed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import ModelError
from ..common.progress import ProgressFn
from .models import DEFAULT_MODEL, REGISTRY, get_spec
from .weights import download

log = logging.getLogger(__name__)

# Our predictor subclass: batched, cached image features and in-memory frames (predictor.py).
PREDICTOR_TARGET = "SAM2FewShotLib.sam2.predictor.VolumePredictor"


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
    checkpoint: Path | None = None,
    device="cpu",
    image_size: int | None = None,
    seed: int | None = None,
    precision: str | None = None,
):
    """The sam2 video predictor (our subclass) from a sam2 config name, with optional weights.

    ``precision`` ("fp32", "bf16" or "auto"; None: the default, sam2/devices.resolve_precision) is what its
    forward work runs in (sam2/devices.model_autocast); the weights stay float32.

    Without a checkpoint the weights are sam2's random initialisation, seeded when ``seed`` is given:
    that is how the tests run the real architecture where no weights can be downloaded.
    """
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    from .devices import resolve_precision

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
    predictor.precision = resolve_precision(precision, torch.device(device)).precision
    if checkpoint is not None:
        from .checkpoint import load_state_dict

        load_state_dict(predictor, Path(checkpoint))
    return predictor.to(device).eval()


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and where: what a request says about its model."""

    name: str = DEFAULT_MODEL
    checkpoint: str | None = None  # a local weights file instead of the registered download
    config: str | None = None  # sam2 config name for ``checkpoint``
    image_size: int | None = None  # default: the model's own
    device: str = "auto"
    offline: bool = False
    random_weights: bool = False  # the real architecture, seeded random weights: tests and speed only
    seed: int = 0
    threads: int | None = None  # torch CPU threads; default: the cores other work leaves free
    precision: str | None = None  # fp32, bf16 or auto; default: bf16 where native (sam2/devices.resolve_precision)

    def key(self) -> tuple:
        """What makes two loaded predictors interchangeable (offline only changes how it is fetched)."""
        return (self.name, self.checkpoint, self.config, self.image_size, self.device, self.random_weights,
                self.seed if self.random_weights else None) + ((self.precision,) if self.precision else ())


@dataclass(frozen=True)
class ResolvedModel:
    config: str
    checkpoint: Path
    image_size: int
    name: str


def resolve(model: str | None, checkpoint: Path | None, config: str | None,
            image_size: int | None, offline: bool) -> ResolvedModel:
    """What to build from the CLI/panel choices: a registered model, or a local --checkpoint file.

    With a checkpoint the config is ``config`` or the named model's; without one the registered
    weights are taken from the cache or downloaded.
    """
    if model and model not in REGISTRY:
        raise ModelError(f"unknown model '{model}': known models are {', '.join(REGISTRY)}")
    spec = get_spec(model) if model else None
    if checkpoint is not None:
        checkpoint = Path(checkpoint).expanduser()
        if not checkpoint.is_file():
            raise ModelError(f"checkpoint {checkpoint} does not exist")
        if config is None and spec is None:
            raise ModelError("--checkpoint needs --config (a sam2 config name) or --model (a registered model)")
        name = spec.name if config is None else f"custom ({checkpoint.name})"
        size = image_size or (spec.image_size if spec else 1024)
        return ResolvedModel(config or spec.config, checkpoint, int(size), name)
    if config is not None:
        raise ModelError("--config applies to --checkpoint FILE only: registered models bring their own config")
    spec = spec or get_spec(DEFAULT_MODEL)
    path = download(spec.name, offline=offline)
    return ResolvedModel(spec.config, path, int(image_size or spec.image_size), spec.name)


def load_predictor(resolved: ResolvedModel, device, precision: str | None = None):
    """The sam2 video predictor with the resolved weights, on ``device``."""
    return build_video_predictor(resolved.config, resolved.checkpoint, device=device,
                                 image_size=resolved.image_size, precision=precision)


def load_model(options: ModelOptions = ModelOptions(), progress: ProgressFn | None = None):
    """The predictor the options ask for, and a dict describing it for the report.

    Registered weights come from the cache or are downloaded (with ``progress`` events when given);
    ``random_weights`` builds the real architecture with seeded random weights (tests, speed).
    """
    import torch

    from .devices import gpu_advice_for, resolve_device, resolve_precision, set_threads

    set_threads(options.threads)  # the count asked for, else the cores other programs leave free
    device = resolve_device(options.device)
    precision, why, slower = resolve_precision(options.precision, device)  # default: bf16 where it is native
    for advice in (gpu_advice_for(options.name, device), slower):
        if advice:
            log.warning(advice)
    torch.manual_seed(options.seed)
    if options.random_weights:
        spec = get_spec(options.name)
        config = options.config or spec.config
        size = options.image_size or spec.image_size
        predictor = build_video_predictor(config, device=device, image_size=size, seed=options.seed,
                                          precision=precision)
        return predictor, {"name": options.name, "weights": "random (seeded)", "config": config, "image_size": size,
                           "device": str(device), "precision": precision, "precision_reason": why}
    if options.checkpoint is None and progress is not None:
        download(options.name, offline=options.offline, progress=progress)  # with events; resolve() finds it
    checkpoint = Path(options.checkpoint) if options.checkpoint else None
    resolved = resolve(options.name, checkpoint, options.config, options.image_size, options.offline)
    predictor = load_predictor(resolved, device, precision)
    return predictor, {"name": resolved.name, "weights": str(resolved.checkpoint), "config": resolved.config,
                       "image_size": resolved.image_size, "device": str(device), "precision": precision,
                       "precision_reason": why}
