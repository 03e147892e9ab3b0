"""LoRA adaptation's settings, apart from the fitting itself (support/lora.py): a method's parameters
hold them, and parameters are read and checked before torch is imported (the CLI's help, the panel)."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import InputError, ModelError

ENCODER_TARGETS = r"image_encoder\.trunk\.blocks\.\d+\.attn\.(qkv|proj)"
DECODER_TARGETS = r"sam_mask_decoder\.transformer\.(layers\.\d+\.)?\w+\.(q_proj|k_proj|v_proj|out_proj)"


@dataclass(frozen=True)
class LoraSettings:
    steps: int = 0  # 0: LoRA off
    rank: int = 4
    alpha: float = 8.0
    decoder: bool = False  # adapters on the mask decoder's transformer attention too
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    batch_size: int = 2
    augmentations: int = 8  # augmented copies per support slice (the original is one of them)
    slices_per_structure: int = 8
    point: bool = False  # a positive point inside the mask with the box
    seed: int = 0

    def check(self) -> None:
        if self.steps < 0 or self.rank < 1 or self.batch_size < 1 or self.augmentations < 1:
            raise InputError("LoRA steps must be 0 or more; rank, batch size and augmentations at least 1")
        if not (self.learning_rate > 0 and self.alpha > 0 and self.slices_per_structure >= 1):
            raise InputError("LoRA learning rate and alpha must be positive, slices per structure at least 1")

    @property
    def target_modules(self) -> str:
        """peft matches a string as a regular expression on the full module name."""
        return f"({ENCODER_TARGETS}|{DECODER_TARGETS})" if self.decoder else ENCODER_TARGETS

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=self.target_modules)


def require_peft() -> None:
    """LoRA is an optional extra: say how to get it rather than fail on an import."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ModelError("LoRA needs the 'peft' package: pip install 'sam2fewshot[lora]'")
