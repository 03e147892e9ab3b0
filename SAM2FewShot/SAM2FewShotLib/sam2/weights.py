"""The weight cache: download from Hugging Face with progress, SHA-256 checks, offline use, import.

Weights live in the per-user cache (never inside a Slicer or Python install), one folder per model.
A small JSON manifest there records each file's verified SHA-256, size and time stamp, so that
later runs can trust an unchanged file without re-hashing it and ``verify`` works offline.
Imports nothing heavy at module level: the Slicer panel lists and downloads weights before torch
is installed.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from ..common.cache import cache_dir
from ..common.digests import file_digest
from ..common.errors import ModelError
from ..common.files import replacing, write_json_atomic
from ..common.progress import ProgressFn
from .models import ModelSpec, get_spec

MANIFEST = "manifest.json"


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


def _record(name: str, path: Path, sha256: str, source: str | None = None) -> None:
    """Note in the manifest that this file, as it is now, has this verified hash."""
    stat = path.stat()
    data = read_manifest()
    source = source or data.get(name, {}).get("source", "cache")
    data[name] = {"file": path.name, "sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "source": source, "verified": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    weights_dir().mkdir(parents=True, exist_ok=True)
    write_json_atomic(data, weights_dir() / MANIFEST)


# --- checksums ------------------------------------------------------------------------------------

def verify_file(path: Path, sha256: str) -> None:
    """ModelError unless the file's SHA-256 is ``sha256``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"cannot verify {path}: no such file")
    actual = file_digest(path)
    if actual != sha256.lower():
        raise ModelError(f"checksum mismatch for {path.name}: SHA-256 is {actual}, expected {sha256.lower()}; "
                         "the file is damaged or not the published one")


def known_sha256(name: str) -> str | None:
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


def _checked_cache(name: str) -> Path | None:
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


def download(name: str, offline: bool = False, progress: bool | ProgressFn = True) -> Path:
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


def _hub_sha256(spec: ModelSpec) -> str | None:
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


def _fetch(spec: ModelSpec, progress: bool | ProgressFn) -> Path:
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


def progress_bar_class(progress: bool | ProgressFn):
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
        sha256, source = file_digest(file), f"imported from {file} (no published SHA-256; recorded as is)"
    target = weights_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(target) as tmp:
            shutil.copyfile(file, tmp)
    except OSError as exc:
        raise ModelError(f"cannot copy {file} into the cache {target.parent}: {exc.strerror or exc}") from exc
    _record(name, target, sha256, source)
    return target


