"""Optional LoRA adapters: SAM2 fitted to one support set's augmented slices, for a fixed number of steps.

Low-rank adapters (peft) go on the image encoder's attention (the Hiera blocks' qkv and proj) and,
optionally, the mask decoder's transformer attention. Training follows sam2's own image path
(forward_image, _prepare_backbone_features, then _track_step on an initial conditioning frame,
which runs _forward_sam_heads) with the support mask's box as prompt and BCE + Dice on SAM2's mask
output plus BCE on its object score. The caller's model is never changed: training runs on a
copy, and inference gets another copy with the adapters merged into its weights, a plain SAM2
predictor again. Adapters are saved per support set (content hash) in the user cache.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..common.context import RunContext
from ..common.digests import files_digest, json_digest
from ..common.errors import InputError, ModelError
from ..common.files import replacing
from ..common.progress import FIT_LORA
from ..io.volume import SupportCase
from ..sam2.devices import model_autocast
from ..sam2.session import VolumeSession
from .lora_settings import LoraSettings, require_peft

FORMAT = "sam2fewshot-lora-1"


@dataclass
class LoraAdapters:
    """Trained adapter weights (peft state-dict names) and the settings they were trained with."""

    settings: LoraSettings
    weights: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)

    def describe(self) -> dict:
        return {"settings": asdict(self.settings), "tensors": len(self.weights),
                "parameters": int(sum(w.numel() for w in self.weights.values())),
                "first_loss": round(self.losses[0], 4) if self.losses else None,
                "last_loss": round(self.losses[-1], 4) if self.losses else None}


def training_slices(session: VolumeSession, supports: Sequence[SupportCase], settings: LoraSettings,
                    size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented support slices cut like the query's (its orientation and in-plane spacing, as matched
    support cuts them: io/reorient.py), (M, size, size), one structure each.

    Square at the model's input size, so the set (and its cache key) does not depend on the query's shape.
    """
    from ..io.reorient import support_in_query_frame
    from ..sam2.frames import VolumeSlices
    from .augment import augment_slices
    from .slices import select_support_slices, stack_support

    axis = session.axis
    images, masks = [], []
    for case, support in enumerate(supports):
        image, labels = support_in_query_frame(*support, session.volume, axis)  # the same objects when aligned
        picked = select_support_slices(VolumeSlices(image.array, axis, session.normalization), labels, axis,
                                       settings.slices_per_structure, case)
        aug = augment_slices(*stack_support(picked, (size, size)), settings.augmentations, seed=settings.seed + case)
        images.append(aug.images)
        masks.append(aug.masks)
    images_t, masks_t = torch.cat(images), torch.cat(masks)
    keep = masks_t.flatten(1).any(dim=1)  # an augmentation can move a small mask out of the slice
    if not bool(keep.any()):
        raise InputError("the supports have no labelled slice to fit LoRA adapters on")
    return images_t[keep], masks_t[keep]


def with_adapters(predictor, settings: LoraSettings):
    """A copy of the predictor with fresh (seeded) adapters; only the adapters are trainable."""
    require_peft()
    from peft import inject_adapter_in_model

    model = copy.deepcopy(predictor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = inject_adapter_in_model(settings.peft_config(), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def fit_lora(
    predictor,
    session: VolumeSession,
    supports: Sequence[SupportCase],
    settings: LoraSettings,
    context: RunContext = RunContext(),
) -> LoraAdapters:
    """Adapters fitted for ``settings.steps`` AdamW steps on the supports' augmented slices (seeded)."""
    settings.check()
    require_peft()
    from peft import get_peft_model_state_dict

    if not supports:
        raise InputError("no support case was given to fit LoRA adapters on")
    images, masks = training_slices(session, supports, settings, predictor.image_size)
    model = with_adapters(predictor, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ModelError("no attention layer of this model matches the LoRA targets")
    optimiser = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    for step in range(settings.steps):
        context.check_cancelled()
        pick = torch.randint(len(images), (settings.batch_size,), generator=generator)
        loss = support_loss(model, images[pick], masks[pick], settings.point)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        context.report(FIT_LORA, step + 1, settings.steps)
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return LoraAdapters(settings, weights, losses)


def support_loss(model, images01: torch.Tensor, masks: torch.Tensor, point: bool = False) -> torch.Tensor:
    """BCE + Dice of SAM2's mask for a box prompt, plus BCE of its object score (every target is present)."""
    from ..sam2.frames import model_input

    device = model.device
    target = masks.to(device)[:, None].float()
    with model_autocast(model):  # the model's --precision
        backbone = model.forward_image(model_input(images01.to(device), model.image_size))
        _, feats, pos, sizes = model._prepare_backbone_features(backbone)
        empty = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        _, out, _, _ = model._track_step(0, True, feats, pos, sizes, box_prompts(masks, point, device), None,
                                         empty, 1, False, None)
    logits, score = out[4].float(), out[6].float().reshape(-1)
    # sam2 replaces the mask of an object it scores absent by a constant: only the score can learn there
    present = (score > 0).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2, 3))
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum(dim=(1, 2, 3)) + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    mask_loss = ((bce + dice) * present).sum() / present.sum().clamp(min=1.0)
    return mask_loss + F.binary_cross_entropy_with_logits(score, torch.ones_like(score))


def box_prompts(masks: torch.Tensor, point: bool, device) -> dict:
    """sam2 point inputs: each mask's box (labels 2, 3), with a positive point nearest its centroid."""
    coords, labels = [], []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        c = [[xs.min(), ys.min()], [xs.max(), ys.max()]]
        lab = [2, 3]
        if point:
            d = (xs - xs.float().mean()) ** 2 + (ys - ys.float().mean()) ** 2
            c.append([xs[d.argmin()], ys[d.argmin()]])
            lab.append(1)
        coords.append(torch.tensor(c, dtype=torch.float32))
        labels.append(lab)
    return {"point_coords": torch.stack(coords).to(device),
            "point_labels": torch.tensor(labels, dtype=torch.int32, device=device)}


def apply_adapters(predictor, adapters: LoraAdapters, merge: bool = True):
    """A copy of the predictor with the adapters; merged into its weights (plain modules again) by default."""
    from peft import set_peft_model_state_dict

    model = with_adapters(predictor, adapters.settings)
    weights = {k: v.to(predictor.device) for k, v in adapters.weights.items()}
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ModelError(f"the LoRA adapters do not fit this model: {len(result.unexpected_keys)} unknown tensors, "
                         f"e.g. {result.unexpected_keys[0]}")
    for p in model.parameters():
        p.requires_grad_(False)
    if merge:
        merge_adapters(model)
    return model.eval()


def merge_adapters(model) -> None:
    """Fold every LoRA layer into its base weights and put the base module back in its place."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


def adapter_key(support_digest: str, model_name: str, settings: LoraSettings, session: VolumeSession) -> str:
    """What the adapters depend on: the support files, the model, the LoRA settings, plane and normalisation."""
    from ..io.slicing import anatomical_plane

    context = {"supports": support_digest, "model": model_name, "lora": asdict(settings),
               "image_size": session.predictor.image_size,
               "plane": anatomical_plane(session.volume, session.axis),
               "normalization": session.describe()["normalization"]}
    return json_digest(context)


def cache_path(key: str, folder: Path | None = None) -> Path:
    from ..common.cache import cache_dir

    return Path(folder or cache_dir() / "lora") / f"{key}.safetensors"


def save_adapters(adapters: LoraAdapters, path: Path) -> Path:
    """safetensors (no pickle), written beside its place and renamed: never half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "settings": json.dumps(asdict(adapters.settings)), "losses": json.dumps(adapters.losses)}
    with replacing(path) as tmp:
        save_file(adapters.weights, str(tmp), metadata=meta)
    return path


def load_adapters(path: Path) -> LoraAdapters:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        settings = LoraSettings(**json.loads(meta["settings"]))
        losses = [float(v) for v in json.loads(meta.get("losses", "[]"))]
    except Exception as exc:
        raise ModelError(f"cannot read LoRA adapters {path}: {exc}") from exc
    return LoraAdapters(settings, weights, losses)


def adapters_for(
    predictor,
    session: VolumeSession,
    supports: Sequence[SupportCase],
    settings: LoraSettings,
    key: str,
    folder: Path | None = None,
    context: RunContext = RunContext(),
) -> tuple[LoraAdapters, bool]:
    """The cached adapters for this key, or new ones fitted and saved; True when they came from the cache."""
    path = cache_path(key, folder)
    if path.is_file():
        try:
            cached = load_adapters(path)
            if cached.settings == settings:
                return cached, True
        except ModelError:
            pass  # a damaged cache file is fitted again and replaced
    adapters = fit_lora(predictor, session, supports, settings, context)
    save_adapters(adapters, path)
    return adapters, False


def adapted_session(session: VolumeSession, supports: Sequence[SupportCase], settings: LoraSettings, model_id: str,
                    context: RunContext = RunContext()) -> tuple[VolumeSession, dict]:
    """A session of the same query on a copy of the model with the support set's adapters merged in
    (cached per support files, model and settings, else fitted), and what the report says of them."""
    files = [f for support in supports for f in (support.files or ())]
    if len(files) != 2 * len(supports):
        raise InputError("LoRA adapters are cached per support files: every support must come from its files")
    key = adapter_key(files_digest(files), model_id, settings, session)
    adapters, cached = adapters_for(session.predictor, session, supports, settings, key, context=context)
    adapted = VolumeSession(apply_adapters(session.predictor, adapters), session.volume, session.axis,
                            session.normalization)
    return adapted, {**adapters.describe(), "cached": cached, "file": str(cache_path(key))}
