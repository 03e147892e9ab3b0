"""The model registry and the weight cache: download with progress, SHA-256 checks, offline use.

Weights live in a per-user cache (never inside a Slicer or Python install), one folder per model.
A small JSON manifest there records each file's verified SHA-256, size and time stamp, so that
later runs can trust an unchanged file without re-hashing it and ``verify`` works offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

from .atomic_write import replacing
from .errors import ModelError

from .progress import ProgressFn  # noqa: F401 (re-exported)

CACHE_ENV = "SAM2FEWSHOT_CACHE"
DEFAULT_MODEL = "sam2.1-tiny"
MANIFEST = "manifest.json"
CHUNK = 8 << 20  # bytes hashed at a time


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    config: str  # a config name inside the installed sam2 package
    hf_repo: str
    hf_file: str
    sha256: Optional[str]  # published SHA-256 of hf_file; None: the hub's own LFS hash is used
    image_size: int
    description: str


def _sam2(name: str, family: str, size: str, cfg: str, sha256: str, description: str) -> ModelSpec:
    """A Meta checkpoint: repo and file named as in sam2/build_sam.py HF_MODEL_ID_TO_FILENAMES."""
    stem = "sam2" if family == "SAM2" else "sam2.1"
    return ModelSpec(name, family, f"configs/{stem}/{stem}_hiera_{cfg}.yaml", f"facebook/{stem}-hiera-{size}",
                     f"{stem}_hiera_{size.replace('-', '_')}.pt", sha256, 1024, description)


# SHA-256 sources (public, cross-checked):
# - SAM2 and SAM2.1: the hashes of Meta's release files (dl.fbaipublicfiles.com/segment_anything_2/
#   072824/ and 092824/), which the facebook/* Hugging Face repos serve unchanged: HASHES in
#   computational-cell-analytics/micro-sam micro_sam/v2/util.py; the SAM2 ones also in
#   mazurowski-lab/SlicerSegmentWithSAM SegmentWithSAM/SegmentWithSAM.py (downloadFileIntoCache
#   checksums). Several projects pin the same values against the Hugging Face URLs (sam2.1 tiny with
#   size 156008466 for facebook/sam2.1-hiera-tiny, base-plus, large).
# - MedSAM2_latest.pt (156040129 bytes): pinned against huggingface.co/wanglab/MedSAM2 by several
#   independent public projects (download scripts and model manifests).
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in (
    _sam2("sam2-tiny", "SAM2", "tiny", "t",
          "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125", "SAM 2 Hiera tiny (July 2024)"),
    _sam2("sam2-small", "SAM2", "small", "s",
          "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3", "SAM 2 Hiera small (July 2024)"),
    _sam2("sam2-base-plus", "SAM2", "base-plus", "b+",
          "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", "SAM 2 Hiera base+ (July 2024)"),
    _sam2("sam2-large", "SAM2", "large", "l",
          "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b", "SAM 2 Hiera large (July 2024)"),
    _sam2("sam2.1-tiny", "SAM2.1", "tiny", "t",
          "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", "SAM 2.1 Hiera tiny: fastest"),
    _sam2("sam2.1-small", "SAM2.1", "small", "s",
          "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", "SAM 2.1 Hiera small"),
    _sam2("sam2.1-base-plus", "SAM2.1", "base-plus", "b+",
          "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", "SAM 2.1 Hiera base+"),
    _sam2("sam2.1-large", "SAM2.1", "large", "l",
          "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", "SAM 2.1 Hiera large: most accurate"),
    # MedSAM2 (Bo Wang lab, github.com/bowang-lab/MedSAM2): its sam2/configs/sam2.1_hiera_t512.yaml is
    # sam2.1_hiera_t.yaml with image_size 512 and RoPE feat_sizes [32, 32], which is exactly what
    # model_build.size_overrides(512) sets; medsam2_infer_video.py pairs it with MedSAM2_latest.pt.
    ModelSpec("medsam2", "MedSAM2", "configs/sam2.1/sam2.1_hiera_t.yaml", "wanglab/MedSAM2", "MedSAM2_latest.pt",
              "c92743b99f00d078bf32a3afcc38aaa9faf1c1692dffe3eaa7a90938c1991060", 512,
              "MedSAM2: SAM 2.1 tiny fine-tuned on 3D medical images and videos, 512 px"),
)}


# Weights of other networks (e.g. DINOv2 for retrieval) that share the cache, download and checksum
# rules but are no SAM2 model: never listed, never resolved as one.
OTHER_WEIGHTS: dict[str, ModelSpec] = {}


def register_weights(spec: ModelSpec) -> None:
    """Let download/verify/import serve a non-SAM2 weights file under its own name."""
    if spec.name in REGISTRY:
        raise ModelError(f"'{spec.name}' is already a SAM2 model name")
    OTHER_WEIGHTS[spec.name] = spec


def get_spec(name: str) -> ModelSpec:
    spec = REGISTRY.get(name) or OTHER_WEIGHTS.get(name)
    if spec is None:
        raise ModelError(f"unknown model '{name}': known models are {', '.join(REGISTRY)}")
    return spec


# --- the cache ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$SAM2FEWSHOT_CACHE, else the platform's per-user cache folder: outside any install folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "sam2fewshot" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sam2fewshot"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sam2fewshot"


def weights_dir() -> Path:
    return cache_dir() / "weights"


def weights_path(name: str) -> Path:
    spec = get_spec(name)
    return weights_dir() / spec.name / spec.hf_file


def is_cached(name: str) -> bool:
    return weights_path(name).is_file()


def read_manifest() -> dict[str, dict]:
    """The verified-hash records, by model name ({} when there is none or it is unreadable)."""
    try:
        data = json.loads((weights_dir() / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(name: str, path: Path, sha256: str, source: Optional[str] = None) -> None:
    """Note in the manifest that this file, as it is now, has this verified hash."""
    from .json_io import write_json_atomic

    stat = path.stat()
    data = read_manifest()
    source = source or data.get(name, {}).get("source", "cache")
    data[name] = {"file": path.name, "sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "source": source, "verified": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    weights_dir().mkdir(parents=True, exist_ok=True)
    write_json_atomic(data, weights_dir() / MANIFEST)


# --- checksums ------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, sha256: str) -> None:
    """ModelError unless the file's SHA-256 is ``sha256``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"cannot verify {path}: no such file")
    actual = sha256_of(path)
    if actual != sha256.lower():
        raise ModelError(f"checksum mismatch for {path.name}: SHA-256 is {actual}, expected {sha256.lower()}; "
                         "the file is damaged or not the published one")


def known_sha256(name: str) -> Optional[str]:
    """The hash a cached file must have: the published one, else the one recorded when it was fetched."""
    spec = get_spec(name)
    return spec.sha256 or read_manifest().get(name, {}).get("sha256")


def verify_cached(name: str) -> str:
    """Re-hash a cached checkpoint against its known SHA-256 (works offline); returns the hash."""
    path = weights_path(name)
    if not path.is_file():
        raise ModelError(f"weights for {name} are not in the cache ({path})")
    expected = known_sha256(name)
    if expected is None:
        raise ModelError(f"no known SHA-256 for {name}: download or import it again to record one")
    verify_file(path, expected)
    _record(name, path, expected)
    return expected


def _trusted(name: str, path: Path) -> bool:
    """True when the manifest vouches for this exact, unchanged file (no re-hash needed)."""
    entry = read_manifest().get(name, {})
    expected = known_sha256(name)
    stat = path.stat()
    return (expected is not None and entry.get("sha256") == expected and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns)


def _checked_cache(name: str) -> Optional[Path]:
    """The cached file when it is there and verified (hashing it once if the manifest cannot vouch)."""
    path = weights_path(name)
    if not path.is_file():
        return None
    if not _trusted(name, path):
        expected = known_sha256(name)
        if expected is None:
            return None  # fetched by other means, never verified: fetch again
        verify_file(path, expected)
        _record(name, path, expected)
    return path


# --- download and import --------------------------------------------------------------------------

def is_offline(offline: bool = False) -> bool:
    """offline=True, or HF_HUB_OFFLINE set as huggingface_hub understands it."""
    if offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download(name: str, offline: bool = False, progress: Union[bool, ProgressFn] = True) -> Path:
    """The verified checkpoint of a registered model, from the cache or fetched from Hugging Face.

    ``progress``: True for the hub's console bar, False for none, or an engine progress callback.
    """
    spec = get_spec(name)
    try:
        cached = _checked_cache(name)
    except ModelError as exc:
        if is_offline(offline):
            raise ModelError(f"cached weights for {name} fail their SHA-256 check and cannot be downloaded again "
                             f"offline: use sam2fewshot models import {name} FILE") from exc
        weights_path(name).unlink(missing_ok=True)  # our own cache copy: fetch it afresh
        cached = None
    if cached is not None:
        return cached
    if is_offline(offline):
        raise ModelError(f"weights for {name} are not in the cache and cannot be downloaded (offline): "
                         f"use --checkpoint FILE or sam2fewshot models import {name} FILE")
    expected = _expected_download_sha256(spec)
    path = _fetch(spec, progress)
    try:
        verify_file(path, expected)
    except ModelError:
        path.unlink(missing_ok=True)
        raise
    _record(name, path, expected, f"https://huggingface.co/{spec.hf_repo}/{spec.hf_file}")
    return path


def _expected_download_sha256(spec: ModelSpec) -> str:
    """The hash the download must have, checked against the hub's before fetching any bytes.

    The metadata request also fails fast without a network, where the download itself would retry.
    """
    hub = _hub_sha256(spec)
    if spec.sha256 and hub and hub != spec.sha256:
        raise ModelError(f"the {spec.hf_file} on huggingface.co/{spec.hf_repo} is not the published file "
                         f"(SHA-256 {hub}, expected {spec.sha256}): not downloading it")
    expected = spec.sha256 or hub
    if expected is None:
        raise ModelError(f"huggingface.co/{spec.hf_repo} publishes no SHA-256 for {spec.hf_file}: "
                         f"download it by hand and run sam2fewshot models import {spec.name} FILE")
    return expected


def _hub_sha256(spec: ModelSpec) -> Optional[str]:
    """The SHA-256 the hub lists for the file (its LFS object id), or None when it lists none."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().get_paths_info(spec.hf_repo, [spec.hf_file], expand=True)
    except Exception as exc:  # noqa: BLE001 - the hub and its HTTP stack raise many types
        raise _network_error(spec, exc) from exc
    if not info:
        raise ModelError(f"huggingface.co/{spec.hf_repo} has no file {spec.hf_file}")
    lfs = getattr(info[0], "lfs", None)
    return lfs.sha256.lower() if lfs is not None and lfs.sha256 else None


def _fetch(spec: ModelSpec, progress: Union[bool, ProgressFn]) -> Path:
    from huggingface_hub import hf_hub_download

    folder = weights_dir() / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return Path(hf_hub_download(spec.hf_repo, spec.hf_file, local_dir=folder,
                                    tqdm_class=progress_bar_class(progress)))
    except Exception as exc:  # noqa: BLE001
        raise _network_error(spec, exc) from exc


def _network_error(spec: ModelSpec, exc: Exception) -> ModelError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return ModelError(f"weights for {spec.name} could not be downloaded from huggingface.co/{spec.hf_repo} "
                      f"({reason}): check the connection, or get {spec.hf_file} elsewhere and run "
                      f"sam2fewshot models import {spec.name} FILE (or pass --checkpoint FILE)")


def progress_bar_class(progress: Union[bool, ProgressFn]):
    """The tqdm class hf_hub_download should use: the hub's own (True), silent (False), or a callback."""
    if progress is True:
        return None
    from tqdm import tqdm

    callback = progress if callable(progress) else None

    class _Reporting(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.done = 0

        def update(self, n=1):
            self.done += n or 0
            if callback is not None:
                callback("download", int(self.done), int(self.total or 0))

    return _Reporting


def import_checkpoint(name: str, file: Path) -> Path:
    """Copy a local checkpoint into the cache after checking it: for sites that cannot download."""
    spec = get_spec(name)
    file = Path(file).expanduser()
    if not file.is_file():
        raise ModelError(f"cannot import {file}: no such file")
    if spec.sha256:
        verify_file(file, spec.sha256)
        sha256, source = spec.sha256, f"imported from {file} (published SHA-256 matched)"
    else:
        from .checkpoint import read_state_dict

        read_state_dict(file)  # at least a loadable state dict; its keys are checked when it is loaded
        sha256, source = sha256_of(file), f"imported from {file} (no published SHA-256; recorded as is)"
    target = weights_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(target) as tmp:
            shutil.copyfile(file, tmp)
    except OSError as exc:
        raise ModelError(f"cannot copy {file} into the cache {target.parent}: {exc.strerror or exc}") from exc
    _record(name, target, sha256, source)
    return target


# --- choosing and loading a model ----------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedModel:
    config: str
    checkpoint: Path
    image_size: int
    name: str


def resolve(model: Optional[str], checkpoint: Optional[Path], config: Optional[str],
            image_size: Optional[int], offline: bool) -> ResolvedModel:
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


def load_predictor(resolved: ResolvedModel, device):
    """The sam2 video predictor with the resolved weights, on ``device``."""
    from .model_build import build_video_predictor

    return build_video_predictor(resolved.config, resolved.checkpoint, device=device,
                                 image_size=resolved.image_size)
