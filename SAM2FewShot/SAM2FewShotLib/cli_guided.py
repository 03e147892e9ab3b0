"""Command-line options of the support-guided methods: guided prompts (optionally with LoRA) and registration.

With --support, --method picks how the supports are used: matched-support (SAM2 conditioned on
matched support slices, the default), guided (a prior's pseudo-masks as per-slice SAM2 prompts)
or registration (the fused registered support labels: CPU only, no model is ever loaded).
"""

from __future__ import annotations

from typing import Optional

from .errors import InputError
from .guided import PRIORS, PROMPT_TYPES, GuidedParams
from .label_fusion import FUSION_METHODS
from .registration import TRANSFORMS

METHODS = ("matched-support", "guided", "registration")
NO_MODEL = {"name": None, "weights": None, "config": None, "image_size": None, "device": "cpu"}


def add_guided_args(group) -> None:
    group.add_argument("--method", choices=METHODS,
                       help="with --support: matched-support (default), guided (a prior's pseudo-mask on each "
                            "slice prompts SAM2) or registration (registered support labels alone: CPU only, "
                            "no model or weights needed)")
    group.add_argument("--prior", default="registration", choices=PRIORS,
                       help="guided: pseudo-masks from registering the supports (default) or from SAM2 with "
                            "support memories and no prompt on the query slice")
    group.add_argument("--prior-scheme", default="video", choices=["pair", "video"],
                       help="guided with --prior sam2: how support memories condition it (default video)")
    group.add_argument("--prompt-type", default="box+mask", choices=PROMPT_TYPES,
                       help="guided: the pseudo-mask's box, the pseudo-mask as a dense hint SAM2 refines, "
                            "or both (default)")
    group.add_argument("--box-margin", type=int, default=5, help="guided: pixels added around each box (default 5)")
    group.add_argument("--transform", default="affine", choices=TRANSFORMS,
                       help="registration (method or prior): affine (default) or affine_bspline")
    group.add_argument("--fusion", default="weighted", choices=FUSION_METHODS,
                       help="registration with several supports: how warped labels are fused (default weighted)")
    group.add_argument("--lora-steps", type=int, default=0,
                       help="guided: first fit LoRA adapters on the supports' augmented slices for N steps "
                            "(0: off, the default; adapters are cached per support set)")
    group.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (default 4)")
    group.add_argument("--lora-decoder", action="store_true",
                       help="LoRA on the mask decoder's attention too, not only the image encoder's")


def support_method(args, supports) -> Optional[str]:
    """The method of a --support run (None without supports); options that need another method fail here."""
    method = args.method or ("matched-support" if supports else None)
    if args.method is not None and not supports:
        raise InputError(f"--method {args.method} needs --support")
    if args.lora_steps and method != "guided":
        raise InputError("--lora-steps works with --method guided")
    if method == "guided":  # before any model is loaded
        guided_params(args).check()
        lora_settings(args).check()
        if args.lora_steps:
            from .lora import require_peft

            require_peft()
    return method


def run_registration(args, query, supports, progress):
    """The registration method: no SAM2, no model; the fused warped support labels are the result."""
    from .frames import slicing_axis
    from .label_fusion import registration_segment

    labels, report = registration_segment(query, supports, args.transform, args.fusion, progress=progress)
    slices = query.array.shape[slicing_axis(query, args.axis)]
    report["timing"]["per_slice_s"] = round(report["timing"]["total_s"] / max(1, slices), 4)
    return labels, report


def guided_params(args) -> GuidedParams:
    from .segment_fewshot import FewShotParams

    fewshot = FewShotParams(scheme=args.prior_scheme, augmentations=args.augmentations,
                            slices_per_structure=args.slices_per_structure, features=args.features, top_k=args.top_k,
                            extent=args.extent, position_weight=args.position_weight, seed=args.seed)
    return GuidedParams(prior=args.prior, prompt_type=args.prompt_type, box_margin=args.box_margin,
                        transform=args.transform, fusion=args.fusion, fewshot=fewshot)


def lora_settings(args):
    from .lora import LoraSettings

    return LoraSettings(steps=args.lora_steps, rank=args.lora_rank, decoder=args.lora_decoder, seed=args.seed)


def run_guided(args, session, supports, progress):
    """Guided prompts, on a LoRA-adapted copy of the model when --lora-steps asks for one."""
    from .cli import _frame_range
    from .guided import segment_guided

    params = guided_params(args)
    lora_report = None
    if args.lora_steps > 0:
        session, lora_report = lora_session(args, session, supports, progress)
    labels, report = segment_guided(session, supports, params, progress=progress,
                                    frame_range=_frame_range(args, session))
    report["lora"] = lora_report
    return labels, report


def lora_session(args, session, supports, progress):
    """A session on a copy of the model with the support set's adapters merged in (cached, else fitted)."""
    from .lora import adapter_key, adapters_for, apply_adapters, cache_path, files_digest
    from .session import VolumeSession

    settings = lora_settings(args)
    model_id = "|".join(str(v or "") for v in (args.model, args.checkpoint, args.config,
                                                "random" if args.random_weights else ""))
    key = adapter_key(files_digest([p for pair in args.support for p in pair]), model_id, settings, session)
    adapters, cached = adapters_for(session.predictor, session, supports, settings, key, progress=progress)
    adapted = VolumeSession(apply_adapters(session.predictor, adapters), session.volume, session.axis,
                            session.normalization)
    return adapted, {**adapters.describe(), "cached": cached, "file": str(cache_path(key))}
