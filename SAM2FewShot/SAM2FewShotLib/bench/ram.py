"""Peak memory of a block of work, and how it scales with the number of slices.

Per-method peaks need a high-water mark that can be reset: ``resource.getrusage``'s ru_maxrss is
the whole process's lifetime maximum, so after the first large method every later one would read
the same. On Linux the kernel's own mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs
and read back exactly; elsewhere (or where that is refused) a thread samples the RSS with psutil,
which can miss a spike shorter than its interval. GPU peaks come from torch's CUDA allocator.

The scaling run builds the model and a synthetic volume in a fresh process per slice count, so
no count inherits memory an earlier one left in the allocator.
"""

from __future__ import annotations

import contextlib
import gc
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

MB = 1024.0 * 1024.0
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def current_rss() -> int:
    import psutil  # here, not at the top: the CLI's parser imports this module, and a fresh Slicer has no psutil

    return psutil.Process().memory_info().rss


def release_free_memory() -> None:
    """Hand memory the allocator keeps after frees back to the system (glibc), so that a block's
    peak above its start is its own working set, not what an earlier block left behind."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the start may then include cached free memory


def _reset_kernel_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _kernel_peak() -> int | None:
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


class PeakMemory:
    """Context manager: peak RSS of this process (and peak CUDA memory) while the block ran."""

    def __init__(self, device=None, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self.gpu_peak_bytes: int | None = None
        self.method = "sampled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        release_free_memory()
        self.start_bytes = self.peak_bytes = current_rss()
        if _reset_kernel_peak() and _kernel_peak() is not None:
            self.method = "VmHWM"
        if self._cuda():
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss())
        if self.method == "VmHWM":
            self.peak_bytes = max(self.peak_bytes, _kernel_peak() or 0)
        if self._cuda():
            import torch

            torch.cuda.synchronize(self.device)
            self.gpu_peak_bytes = int(torch.cuda.max_memory_allocated(self.device))

    def _cuda(self) -> bool:
        return self.device is not None and getattr(self.device, "type", str(self.device)).startswith("cuda")

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

    @property
    def above_start_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)

    def as_json(self) -> dict:
        return {
            "peak_rss_mb": round(self.peak_bytes / MB, 1),
            "peak_rss_above_start_mb": round(self.above_start_bytes / MB, 1),
            "peak_gpu_mb": None if self.gpu_peak_bytes is None else round(self.gpu_peak_bytes / MB, 1),
            "rss_method": self.method,
        }


@dataclass(frozen=True)
class ModelRecipe:
    """What a fresh process needs to build the same model: config, weights (None: random), size, seed."""

    config: str
    checkpoint: str | None
    image_size: int
    seed: int
    device: str
    threads: int | None = None  # torch CPU threads in the fresh process

    def build(self):
        import torch

        from ..sam2.build import build_video_predictor

        if self.threads:
            torch.set_num_threads(self.threads)
        return build_video_predictor(self.config, self.checkpoint, device=self.device,
                                     image_size=self.image_size, seed=self.seed)


def memory_scaling(
    recipe: ModelRecipe,
    counts: Sequence[int],
    size: int = 256,
    n_structures: int = 3,
    feature_budget_mb: float | None = None,
    on_point: Callable[[dict], None] | None = None,
    mmap_threshold: int | None = None,
) -> list[dict]:
    """Propagate mode from the middle slice of synthetic volumes of each slice count, one process each.

    ``mmap_threshold`` fixes glibc's M_MMAP_THRESHOLD in those processes: large blocks are then
    mapped and unmapped one by one, so freed memory goes back to the system at once instead of
    staying in the heap (glibc raises the threshold as a program frees large blocks).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    points = []
    env = {} if mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(int(mmap_threshold))}
    for n in counts:
        with _environment(env), ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            point = pool.submit(scaling_point, recipe, int(n), size, n_structures, feature_budget_mb).result()
        point["mmap_threshold"] = mmap_threshold
        points.append(point)
        if on_point:
            on_point(point)
    return points


@contextlib.contextmanager
def _environment(values: dict):
    """Environment variables set for the processes started inside the block, restored after."""
    import os

    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def scaling_point(recipe: ModelRecipe, n_slices: int, size: int, n_structures: int,
                  feature_budget_mb: float | None) -> dict:
    """One slice count, in this (fresh) process: peak memory above the start, and what it is made of."""
    from ..methods.propagate import segment_propagate
    from ..sam2.conditioning import Prompt
    from ..sam2.session import VolumeSession
    from .synthetic import slice_masks, synthetic_case

    predictor = recipe.build()
    volume, truth = synthetic_case(n_slices, size, n_structures, seed=recipe.seed)
    mid = n_slices // 2
    prompts = [Prompt(frame=mid, obj_id=v, mask=m) for v, m in slice_masks(truth, mid).items()]
    budget = {} if feature_budget_mb is None else {"feature_budget_bytes": int(feature_budget_mb * MB)}
    start = time.perf_counter()
    with PeakMemory(predictor.device) as mem:
        session = VolumeSession(predictor, volume, axis=0, **budget)
        labels, _ = segment_propagate(session, prompts, truth.segments)
        seconds = time.perf_counter() - start
        frames = session.frames.nbytes
        features = session.cache.held_bytes
        spilled = session.cache.spill.nbytes
    gc.collect()
    release_free_memory()
    live = current_rss() - mem.start_bytes  # what is still held, the session and result alive
    h, w = session.frames.height, session.frames.width
    # propagation's working labels become the result label map (one byte per voxel, sliced along k)
    outputs = labels.volume.array.nbytes
    excess = mem.above_start_bytes - frames
    return {
        "slices": n_slices, "slice_shape": [h, w], "structures": n_structures,
        "image_size": predictor.image_size,
        "feature_budget_mb": None if feature_budget_mb is None else float(feature_budget_mb),
        "seconds": round(seconds, 2), "per_slice_s": round(seconds / n_slices, 4),
        "frames_mb": round(frames / MB, 1), "features_held_mb": round(features / MB, 1),
        "features_on_disk_mb": round(spilled / MB, 1),
        "outputs_mb": round(outputs / MB, 1), "above_frames_mb": round(excess / MB, 1),
        "rest_mb": round((excess - features - outputs) / MB, 1), "live_at_end_mb": round(live / MB, 1),
        **mem.as_json(),
    }


def fit_per_slice(points: Sequence[dict], key: str) -> float | None:
    """Least-squares slope of ``key`` (MB) against the slice count: MB per extra slice."""
    import numpy as np

    xs = [p["slices"] for p in points if p.get(key) is not None]
    if len(set(xs)) < 2:
        return None
    ys = [p[key] for p in points if p.get(key) is not None]
    return float(np.polyfit(xs, ys, 1)[0])
