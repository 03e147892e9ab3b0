"""Loading SAM2 weights safely (tensors only, strict keys and shapes, one clear line per failure),
and fingerprinting a model's weights.

A checkpoint comes from the network or from a user's disk, so it is read with
``torch.load(weights_only=True)`` (no arbitrary Python objects) and checked against the model
before anything is copied, so that a wrong file never leaves a half-loaded model behind.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..common.digests import bytes_digest
from ..common.errors import ModelError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_PROTO = 0x80  # first byte of a pickle (protocol 2+): torch's legacy format, or a plain pickle
EXAMPLES = 3  # key names quoted in an error message


def load_state_dict(predictor: torch.nn.Module, path: Path) -> None:
    """Copy the weights in ``path`` into ``predictor`` after checking that every key and shape fits."""
    path = Path(path)
    state = read_state_dict(path)
    check_fits(predictor.state_dict(), state, path.name)
    try:
        predictor.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise ModelError(f"cannot load {path.name}: {exc}".splitlines()[0]) from exc


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file: sam2's ``{"model": state_dict}`` or a bare state dict."""
    path = Path(path)
    kind = _file_kind(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise ModelError(
                f"refusing to load {path.name}: it holds Python objects besides tensors, which a safe load "
                "(torch.load weights_only=True) does not run; it is not a SAM2 weights file"
            ) from exc
        raise ModelError(_corrupt_message(path, kind)) from exc
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError) as exc:
        raise ModelError(_corrupt_message(path, kind)) from exc
    return _state_dict_of(obj, path.name)


def check_fits(model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor], name: str) -> None:
    """ModelError unless ``state`` has exactly the model's keys, each with the model's shape."""
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    if missing or unexpected:
        raise ModelError(
            f"{name} holds weights of another architecture: {len(missing)} of the model's {len(model_state)} "
            f"tensors are missing ({_examples(missing)}) and {len(unexpected)} are unexpected "
            f"({_examples(unexpected)}); check --model or --config"
        )
    wrong = [k for k in model_state if tuple(state[k].shape) != tuple(model_state[k].shape)]
    if wrong:
        k = wrong[0]
        raise ModelError(
            f"{name} does not fit the model: {len(wrong)} tensors have other shapes, e.g. {k} is "
            f"{list(state[k].shape)} in the file and {list(model_state[k].shape)} in the model; "
            "check --model or --config"
        )


def _file_kind(path: Path) -> str:
    """'zip', 'pickle' or a ModelError: decided from the first bytes, before torch sees the file."""
    if not path.exists():
        raise ModelError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} is not a file")
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if not head:
        raise ModelError(f"checkpoint {path} is empty")
    if head == ZIP_MAGIC:
        return "zip"
    if head[0] == PICKLE_PROTO:
        return "pickle"
    raise ModelError(f"{path.name} is not a PyTorch checkpoint (a .pt file written by torch.save)")


def _corrupt_message(path: Path, kind: str) -> str:
    if kind == "zip":
        return (f"checkpoint {path.name} is truncated or corrupt ({path.stat().st_size} bytes): "
                "download or copy it again")
    return f"{path.name} is not a readable PyTorch checkpoint (a pickle that torch.load cannot read as one)"


def _state_dict_of(obj: object, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if isinstance(obj, dict) and obj and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return obj
    found = f"a dict with keys {_examples(sorted(map(str, obj)))}" if isinstance(obj, dict) else type(obj).__name__
    raise ModelError(
        f"{name} holds no state dict: expected {{'model': state_dict}} (sam2's format) or a bare state dict, "
        f"found {found}"
    )


def _examples(keys: list[str]) -> str:
    if not keys:
        return "none"
    more = ", ..." if len(keys) > EXAMPLES else ""
    return ", ".join(keys[:EXAMPLES]) + more


def weights_fingerprint(module: torch.nn.Module, sample: int = 256) -> str:
    """A short hash of a model's weights (names, shapes, a sample of values): tells checkpoints and
    random seeds apart without hashing hundreds of megabytes."""
    chunks = []
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        chunks += [f"{name}{tuple(tensor.shape)}".encode(), flat[:sample].float().cpu().numpy().tobytes(),
                   flat[-sample:].float().cpu().numpy().tobytes()]
    return bytes_digest(*chunks, length=16)
