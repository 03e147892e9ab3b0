"""Per-slice tensors offloaded to an unnamed scratch file, so memory does not grow with slices.

A FeatureCache keeps only a small window of encoder features in memory (RAM, or GPU memory on
CUDA); the frames it evicts are written here rather than thrown away: bringing one back is one
read, far cheaper than another pass through the image encoder, and the file lives on disk, not in
the process's memory. Propagation parks its forward-pass logits here until the backward pass.
The file is unlinked as soon as it is made, so it vanishes when the process ends, even when the
worker is killed on cancel; nothing is left behind in the user's folders.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_SPILL_BYTES = 8 << 30  # at most this much disk per file, and never over half the free space
DEFAULT_MEMORY_BYTES = 64 << 20  # what an OffloadedDict keeps in memory before it writes to disk


def scratch_dir() -> Path:
    """The per-user cache folder (not /tmp, which is often RAM-backed tmpfs)."""
    from ..common.cache import cache_dir

    return cache_dir() / "scratch"


class SpillFile:
    """Per-frame lists of tensors with one layout, appended to one scratch file and read back on demand.

    A frame's features never change, so a frame is written once and its slot is never reused;
    when the budget is spent (or the disk fails) further frames are simply not kept.
    """

    def __init__(self, max_bytes: int = DEFAULT_SPILL_BYTES, directory: Path | None = None):
        self.max_bytes = max(0, int(max_bytes))
        self.directory = directory
        self._file = None
        self._offsets: dict[int, int] = {}
        self._layout: list[tuple[tuple[int, ...], torch.dtype]] | None = None
        self._frame_bytes = 0
        self._end = 0

    def __contains__(self, idx: int) -> bool:
        return idx in self._offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def __iter__(self):
        return iter(self._offsets)

    @property
    def nbytes(self) -> int:
        """Bytes written to disk so far."""
        return self._end

    def put(self, idx: int, tensors: list[torch.Tensor]) -> bool:
        """Keep one frame's tensors on disk; False when it could not be kept (budget, disk)."""
        if idx in self._offsets:
            return True
        layout = [(tuple(t.shape), t.dtype) for t in tensors]
        if self._layout is None:
            self._layout = layout
            self._frame_bytes = sum(t.numel() * t.element_size() for t in tensors)
        elif layout != self._layout:
            raise ValueError("spilled frames must all have the same tensor layout")
        if self._end + self._frame_bytes > self.max_bytes or not self._open():
            return False
        try:
            self._file.seek(self._end)
            for t in tensors:
                write_exactly(self._file, tensor_bytes(t.detach().to("cpu")).numpy())
        except OSError as exc:  # a full or failing disk: keep going, re-encoding instead
            log.warning("feature offloading stopped (%s); evicted slices will be encoded again", exc)
            self.max_bytes = 0
            return False
        self._offsets[idx] = self._end
        self._end += self._frame_bytes
        return True

    def get(self, idx: int) -> list[torch.Tensor]:
        """The frame's tensors, on the CPU, exactly as they were put."""
        self._file.seek(self._offsets[idx])
        out = []
        for shape, dtype in self._layout:
            t = torch.empty(shape, dtype=dtype)
            read_exactly(self._file, tensor_bytes(t).numpy())
            out.append(t)
        return out

    def discard(self, idx: int) -> None:
        """Forget a frame (its bytes stay in the file until it is closed)."""
        self._offsets.pop(idx, None)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._offsets.clear()
        self._end = 0

    def _open(self) -> bool:
        if self._file is not None:
            return True
        try:
            directory = Path(self.directory) if self.directory is not None else scratch_dir()
            directory.mkdir(parents=True, exist_ok=True)
            self.max_bytes = min(self.max_bytes, shutil.disk_usage(directory).free // 2)
            if self._frame_bytes > self.max_bytes:
                return False
            # unbuffered: a write that fails (disk full) fails here, not at a later flush
            self._file = tempfile.TemporaryFile(dir=directory, prefix="sam2fewshot-", buffering=0)
        except OSError as exc:
            log.warning("cannot offload features to disk (%s); evicted slices will be encoded again", exc)
            self.max_bytes = 0
            return False
        return True


class OffloadedDict:
    """int -> tensor, all of one layout: the newest ``max_bytes`` in memory, older ones on disk.

    For results that wait for a later pass over the volume; an entry that cannot go to disk
    (budget, disk failure) stays in memory, since it is not recomputable.
    """

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES, spill_bytes: int = DEFAULT_SPILL_BYTES):
        self.max_bytes = max(0, int(max_bytes))
        self._memory: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._memory_bytes = 0
        self._disk = SpillFile(spill_bytes)
        self._pinned: set[int] = set()  # in memory because the disk refused them

    def __contains__(self, key: int) -> bool:
        return key in self._memory or key in self._disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    def keys(self) -> list[int]:
        return sorted(set(self._memory) | set(self._disk))

    def __setitem__(self, key: int, value: torch.Tensor) -> None:
        self.pop(key)
        self._memory[key] = value
        self._memory_bytes += self._nbytes(value)
        for old in list(self._memory):
            if self._memory_bytes <= self.max_bytes or old == key:
                break
            if old not in self._pinned and self._disk.put(old, [self._memory[old]]):
                self._memory_bytes -= self._nbytes(self._memory.pop(old))
            else:
                self._pinned.add(old)

    def pop(self, key: int, default: torch.Tensor | None = None) -> torch.Tensor | None:
        if key in self._memory:
            self._pinned.discard(key)
            value = self._memory.pop(key)
            self._memory_bytes -= self._nbytes(value)
            return value
        if key in self._disk:
            value = self._disk.get(key)[0]
            self._disk.discard(key)
            return value
        return default

    def close(self) -> None:
        self._memory.clear()
        self._memory_bytes = 0
        self._disk.close()

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()


def write_exactly(file, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[file.write(view):]


def read_exactly(file, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = file.readinto(view)
        if not n:
            raise OSError("the file is shorter than what was written to it")
        view = view[n:]


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (works for bfloat16, which numpy lacks)."""
    return t.contiguous().reshape(-1).view(torch.uint8)
