"""Encoder features of support frame sets, shared by every query one model segments.

Matched support encodes tens of augmented support slices per run, often more than the query's own
slices; a cohort segmented from the same supports (and a second run of the CLI) would encode them
again and again. A store keeps the last few sets in memory, and, given a folder, saves complete sets
there (keyed by the frames' content and the model's weights) so later runs read them back instead.
The folder has a size budget; the least recently used sets go first.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

from ..common.digests import text_digest
from ..common.progress import ENCODE_SUPPORTS
from .feature_cache import DEFAULT_MEMORY_BYTES, FeatureCache
from .frames import FrameSource, frames_per_batch
from .offload import DEFAULT_SPILL_BYTES

log = logging.getLogger(__name__)

DEFAULT_DISK_BUDGET = 4 << 30  # bytes of saved support features kept in the folder


class SupportFeatureStore:
    """Support feature caches by content key: ``keep`` in memory, complete ones saved to ``folder``."""

    def __init__(self, predictor, folder: Path | None = None, keep: int = 2, batch_size: int | None = None,
                 max_bytes: int = DEFAULT_MEMORY_BYTES, spill_bytes: int = DEFAULT_SPILL_BYTES,
                 disk_budget: int = DEFAULT_DISK_BUDGET):
        self.predictor = predictor
        self.folder = Path(folder) if folder is not None else None
        self.keep = max(1, keep)
        self.batch_size = batch_size or frames_per_batch(predictor.device)
        self.max_bytes, self.spill_bytes, self.disk_budget = max_bytes, spill_bytes, disk_budget
        self._caches: OrderedDict[str, FeatureCache] = OrderedDict()
        self._saved: set[str] = set()
        self._model_id: str | None = None
        self.restored = 0  # sets read back from the folder

    def cache(self, key: str, frames: FrameSource) -> FeatureCache:
        """The features of these support frames: in memory, saved earlier, or a new (empty) cache."""
        if key in self._caches:
            self._caches.move_to_end(key)
            return self._caches[key]
        cache = self._new(frames)
        if self._restore(key, cache) is False:  # a damaged file: start afresh
            cache.close()
            cache = self._new(frames)
        self._caches[key] = cache
        while len(self._caches) > self.keep:
            old_key, old = self._caches.popitem(last=False)
            self._save(old_key, old)
            old.close()
        return cache

    def _new(self, frames: FrameSource) -> FeatureCache:
        return FeatureCache(self.predictor, frames, self.predictor.device, batch_size=self.batch_size,
                            max_bytes=self.max_bytes, spill_bytes=self.spill_bytes, stage=ENCODE_SUPPORTS)

    def save(self) -> None:
        """Save every complete set held in memory that is not in the folder yet."""
        for key, cache in self._caches.items():
            self._save(key, cache)

    def drop(self) -> None:
        """Forget the sets in memory (the next run encodes its supports, or reads them back)."""
        for cache in self._caches.values():
            cache.close()
        self._caches.clear()

    def close(self) -> None:
        self.save()
        self.drop()

    # --- the folder -------------------------------------------------------------------------------

    def _path(self, key: str) -> Path | None:
        if self.folder is None:
            return None
        if self._model_id is None:  # features depend on the weights, the input size and the compute type
            from .checkpoint import weights_fingerprint
            from .devices import precision_tag

            self._model_id = f"{weights_fingerprint(self.predictor)}:{self.predictor.image_size}:" \
                             f"{self.predictor.device.type}" + precision_tag(self.predictor)
        name = text_digest(f"{self._model_id}|{key}", 32)
        return self.folder / f"{name}.features"

    def _restore(self, key: str, cache: FeatureCache) -> bool | None:
        """True when the saved set was read into ``cache``, False when it could not be (and is gone),
        None when there is none."""
        from .feature_files import FeatureFileError

        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            cache.restore(path)
        except (FeatureFileError, OSError) as exc:
            log.warning("saved support features %s could not be read (%s); encoding them again", path.name, exc)
            path.unlink(missing_ok=True)
            return False
        os.utime(path)  # recently used: the last to go when the folder is over budget
        self._saved.add(key)
        self.restored += 1
        return True

    def _save(self, key: str, cache: FeatureCache) -> None:
        path = self._path(key)
        if path is None or key in self._saved or not cache.complete:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if cache.save(path):
                self._saved.add(key)
                self._trim()
        except OSError as exc:  # a full or read-only disk: the features are encoded again next time
            log.warning("support features could not be saved in %s (%s)", self.folder, exc.strerror or exc)

    def _trim(self) -> None:
        """Delete the least recently used saved sets while the folder is over its budget."""
        files = sorted(self.folder.glob("*.features"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files[:-1]:  # the newest stays, even alone over budget
            if total <= self.disk_budget:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
