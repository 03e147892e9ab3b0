"""Encoder features in a file: written and read back frame by frame, so a set never sits in memory whole.

The layout is a small JSON header (frame count, every tensor's shape and dtype) then raw bytes: the
positional encodings once, then per frame its feature maps and its pooled embedding. No pickle: a
damaged or foreign file is refused by its header or its size, never executed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from ..common.files import replacing
from .offload import read_exactly, tensor_bytes, write_exactly

MAGIC = b"SAM2FewShot-features-1\n"
DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16)}


class FeatureFileError(ValueError):
    """Not a features file of ours, or a damaged one."""


def write_features(path: Path, pos_enc: list[torch.Tensor],
                   frames: Iterator[tuple[list[torch.Tensor], torch.Tensor]], count: int) -> None:
    """``count`` frames of (feature maps, embedding), all of one layout, atomically into ``path``."""
    header = None
    written = 0
    with replacing(path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
        for fpn, embedding in frames:
            tensors = [t.detach().cpu() for t in fpn] + [embedding.detach().cpu()]
            if header is None:
                header = {"frames": count, "pos_enc": [_spec(t) for t in pos_enc],
                          "frame": [_spec(t) for t in tensors]}
                text = json.dumps(header).encode()
                f.write(MAGIC + struct.pack("<Q", len(text)) + text)
                for t in pos_enc:
                    write_exactly(f, tensor_bytes(t.detach().cpu().contiguous()).numpy())
            elif [_spec(t) for t in tensors] != header["frame"]:
                raise FeatureFileError("every frame must have the same tensor layout")
            for t in tensors:
                write_exactly(f, tensor_bytes(t.contiguous()).numpy())
            written += 1
        if written != count:
            raise FeatureFileError(f"{written} frames were given, {count} announced")


def read_features(path: Path,
                  count: int) -> tuple[list[torch.Tensor], Iterator[tuple[list[torch.Tensor], torch.Tensor]]]:
    """(positional encodings, an iterator over ``count`` frames' (feature maps, embedding)); FeatureFileError
    when the file is not one of ours, holds another number of frames, or not what its header announces."""
    f = open(path, "rb")
    try:
        if f.read(len(MAGIC)) != MAGIC:
            raise FeatureFileError("not a SAM2FewShot features file")
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size).decode())
        pos_specs, frame_specs = header["pos_enc"], header["frame"]
        if int(header["frames"]) != count:
            raise FeatureFileError(f"the file holds {header['frames']} frames, not {count}")
        expected = f.tell() + _nbytes(pos_specs) + count * _nbytes(frame_specs)
        if Path(path).stat().st_size != expected:
            raise FeatureFileError(f"the file holds {Path(path).stat().st_size} bytes, its header announces {expected}")
        pos_enc = [_read(f, spec) for spec in pos_specs]
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        f.close()
        raise FeatureFileError(str(exc)) from exc

    def frames() -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        with f:
            for _ in range(count):
                tensors = [_read(f, spec) for spec in frame_specs]
                yield tensors[:-1], tensors[-1]

    return pos_enc, frames()


def _spec(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype)]


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise FeatureFileError(f"unexpected tensor type {name}")
    return DTYPES[name]


def _nbytes(specs: list) -> int:
    total = 0
    for shape, dtype in specs:
        n = 1
        for d in shape:
            n *= int(d)
        total += n * torch.empty(0, dtype=_dtype(dtype)).element_size()
    return total


def _read(f, spec: list) -> torch.Tensor:
    shape, dtype = spec
    t = torch.empty([int(d) for d in shape], dtype=_dtype(dtype))
    read_exactly(f, tensor_bytes(t).numpy())
    return t
