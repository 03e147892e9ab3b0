"""Content digests, one way each, SHA-256 throughout: of a file, of several files as one, of JSON data,
of a text. Every key, fingerprint and record of the engine is made here."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 8 << 20  # bytes read at a time: weights files are hundreds of MB


def file_digest(path, algorithm: str = "sha256") -> str:
    """The digest of a file's contents, read in chunks (another ``algorithm`` only for a checksum someone
    else published, e.g. the MSD archive's MD5)."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def combined_digest(digests: Iterable[str]) -> str:
    """Several digests, in order, as one (a case's image, labels and sidecar; a DICOM series' files)."""
    return text_digest("\n".join(digests))


def files_digest(paths: Iterable) -> str:
    """One digest of the contents of files, in order; a folder stands for its files in name order."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return combined_digest(file_digest(f) for f in files)


def json_digest(data: Any, length: int | None = None) -> str:
    """The digest of JSON data with sorted keys (values JSON cannot hold are written as text)."""
    return text_digest(json.dumps(data, sort_keys=True, default=str), length)


def text_digest(text: str, length: int | None = None) -> str:
    """The digest of a text (UTF-8), cut to ``length`` hex digits when given."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def bytes_digest(*chunks: bytes, length: int | None = None) -> str:
    """The digest of byte strings in order (array contents, sampled weights), cut to ``length`` when given."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:length]
