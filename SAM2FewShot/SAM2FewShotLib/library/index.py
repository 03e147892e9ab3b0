"""The on-disk embedding index of a library: one vector per labelled slice, kept in step with the files.

Layout: ``<index root>/<config id>/`` holds ``manifest.json`` and, per case, two .npy shards named
by the case's content hash (``<sha>.emb.npy``: (n, D) float32 unit vectors; ``<sha>.rows.npy``:
one ROW_DTYPE record per labelled slice and structure). No pickle anywhere. The config id hashes
what the vectors depend on: the feature model (its weights' fingerprint, input size, pooling),
the plane, the normalisation, and the in-plane convention of the slices (orientation.SLICES; FORMAT 2).

A case's content hash is the SHA-256 of its image, label and sidecar files; the manifest caches
each file's hash by path, size and mtime, so an unchanged library is checked with stat() alone.
Syncing embeds only new or changed cases, drops removed ones, and rebuilds any shard or manifest
found damaged (with a warning): the index is a cache, never a reason to fail.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common.digests import combined_digest, file_digest, json_digest
from ..common.errors import Cancelled, InputError, SAM2FewShotError
from ..common.files import replacing, write_json_atomic
from ..common.progress import EMBED_LIBRARY, ProgressFn
from ..common.warnings_summary import RepeatedWarnings
from ..io.volume import Segment, default_segments
from .cases import ROW_DTYPE, LibraryCase
from .index_entries import valid_entry
from .orientation import SLICES

log = logging.getLogger(__name__)

FORMAT = 2  # 1 embedded slices as stored: its indexes get other ids, never reused (library/orientation.py)
MANIFEST = "manifest.json"
MANIFEST_EVERY_S = 2.0  # while building, save progress at most this often
QUERY_CHUNK = 64  # query slices per matmul: bounds the (chunk, N) similarity matrix
OUTSIDE_WINDOW = 4.0  # score penalty: cosines lie in [-1, 1], so in-window entries always rank first


@dataclass(frozen=True)
class IndexConfig:
    """What the stored vectors depend on; a change of any of it is another index."""

    features: str
    plane: str
    normalization: dict

    def as_dict(self) -> dict:
        return {"format": FORMAT, "features": self.features, "plane": self.plane,
                "normalization": self.normalization, "slices": SLICES}

    @property
    def id(self) -> str:
        return json_digest(self.as_dict(), 16)


@dataclass
class CaseEmbeddings:
    """What embedding one case yields: (n, D) unit vectors, their rows, and the case's segments."""

    embeddings: np.ndarray
    rows: np.ndarray  # ROW_DTYPE, rows["emb"] indexes ``embeddings``
    segments: list[dict]  # value, name, color, terminology
    num_slices: int


EmbedCase = Callable[[LibraryCase], CaseEmbeddings]


@dataclass
class SyncStats:
    cases: int = 0
    embedded: int = 0  # cases run through the feature model
    reused: int = 0
    removed: int = 0
    hashed: int = 0  # files whose SHA-256 was computed (the rest were trusted by size and mtime)
    recovered: int = 0  # damaged shards or manifest rebuilt
    skipped: list = field(default_factory=list)  # [case id, reason] of unreadable cases
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class FileHashes:
    """SHA-256 of files, trusted from an earlier run while their size and mtime are unchanged."""

    def __init__(self, known: dict):
        self.known = known if isinstance(known, dict) else {}
        self.used: dict[str, dict] = {}
        self.hashed = 0

    def sha256(self, path: Path) -> str:
        key = str(Path(path).resolve())
        st = os.stat(key)
        entry = self.known.get(key)
        if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            sha = str(entry.get("sha256"))
        else:
            sha = file_digest(key)
            self.hashed += 1
        self.used[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        return sha

    def content_key(self, files: Sequence[Path]) -> str:
        """One hash for a case: its files' hashes in order (image, labels, sidecar)."""
        return combined_digest(self.sha256(f) for f in files)


class EmbeddingIndex:
    """The index of one library for one feature configuration."""

    def __init__(self, root: Path, config: IndexConfig):
        self.root = Path(root)
        self.config = config
        self.folder = self.root / config.id
        self.manifest_path = self.folder / MANIFEST
        self._warnings = RepeatedWarnings(log)  # per-case warnings of a sync or load, one line per kind

    # ------------------------------------------------------------------------------ manifest

    def read_manifest(self) -> dict:
        """The manifest, or a fresh one (with a warning when the file is there but unusable)."""
        fresh = {"format": FORMAT, "config": self.config.as_dict(), "files": {}, "cases": {}}
        if not self.manifest_path.is_file():
            return fresh
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            ok = (isinstance(data, dict) and data.get("config") == self.config.as_dict()
                  and isinstance(data.get("files"), dict) and isinstance(data.get("cases"), dict)
                  and all(valid_entry(e) for e in data["cases"].values()))
        except (OSError, ValueError) as exc:
            ok, data = False, str(exc)
        if not ok:
            log.warning("library index: %s is damaged or from another version; rebuilding it", self.manifest_path)
            fresh["recovered"] = True
            return fresh
        return data

    def _save(self, manifest: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = {k: v for k, v in manifest.items() if k != "recovered"}
        write_json_atomic(manifest, self.manifest_path)

    # ------------------------------------------------------------------------------ syncing

    def sync(self, cases: Sequence[LibraryCase], embed_case: EmbedCase,
             progress: ProgressFn | None = None) -> tuple[IndexData, SyncStats]:
        """Bring the index in step with ``cases`` (one case in memory at a time) and load it."""
        start = time.perf_counter()
        manifest = self.read_manifest()
        stats = SyncStats(cases=len(cases), recovered=int(bool(manifest.get("recovered"))))
        hashes = FileHashes(manifest["files"])
        old = manifest["cases"]
        by_content = {e["content"]: e for e in old.values()}
        new: dict[str, dict] = {}
        loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        last_save = time.monotonic()
        try:
            with self._warnings:  # skipped and damaged cases: one line per kind, not one per case
                for n, case in enumerate(cases):
                    found = self._sync_case(case, hashes, old, by_content, embed_case, stats)
                    if found is not None:
                        new[case.id], loaded[case.id] = found
                    if stats.embedded and time.monotonic() - last_save > MANIFEST_EVERY_S:
                        self._save(dict(manifest, cases={**old, **new}, files={**hashes.known, **hashes.used}))
                        last_save = time.monotonic()
                    if progress:
                        progress(EMBED_LIBRARY, n + 1, len(cases))
        except BaseException:  # cancelled or failed: keep what was embedded for the next run
            if stats.embedded:
                self._save(dict(manifest, cases={**old, **new}, files={**hashes.known, **hashes.used}))
            raise
        stats.removed = len(set(old) - set(new))
        stats.hashed = hashes.hashed
        manifest.update(cases=new, files=hashes.used)
        if stats.embedded or stats.removed or stats.recovered or new != old or hashes.hashed:
            self._save(manifest)
            self._remove_orphans(new)
        stats.seconds = round(time.perf_counter() - start, 3)
        return IndexData.from_shards([(cid, new[cid], loaded[cid]) for cid in new]), stats

    def _sync_case(self, case: LibraryCase, hashes: FileHashes, old: dict, by_content: dict,
                   embed_case: EmbedCase, stats: SyncStats) -> tuple[dict, tuple] | None:
        """The case's manifest entry and loaded shards: reused when its content is indexed, else embedded."""
        try:
            content = hashes.content_key(case.files)
        except OSError as exc:
            stats.skipped.append([case.id, f"cannot read: {exc.strerror or exc}"])
            return None
        entry = old.get(case.id) if old.get(case.id, {}).get("content") == content else by_content.get(content)
        shards = self._load_entry(entry) if entry is not None else None
        if entry is not None and shards is None:
            stats.recovered += 1
        if shards is None:
            try:
                entry, shards = self._embed(case, content, embed_case)
            except SAM2FewShotError as exc:
                if isinstance(exc, Cancelled):
                    raise
                stats.skipped.append([case.id, str(exc)])
                self._warnings.add("library index: cases skipped", f"{case.id} ({exc})",
                                   f"library index: case {case.id} skipped: {exc}")
                return None
            stats.embedded += 1
        else:
            stats.reused += 1
        return dict(entry, image=str(case.image), labels=str(case.labels)), shards

    def load(self) -> IndexData:
        """The index as stored, without looking at the library's files (damaged shards are left out)."""
        manifest = self.read_manifest()
        parts = []
        with self._warnings:
            for cid, entry in manifest["cases"].items():
                shards = self._load_entry(entry)
                if shards is not None:
                    parts.append((cid, entry, shards))
        return IndexData.from_shards(parts)

    def _embed(self, case: LibraryCase, content: str, embed_case: EmbedCase) -> tuple[dict, tuple]:
        emb = embed_case(case)
        if len(emb.rows) == 0:
            raise InputError(f"{case.labels} has no labelled voxel")
        entry = self._write_shards(content, emb)
        return entry, (emb.embeddings, emb.rows)

    def _write_shards(self, content: str, emb: CaseEmbeddings) -> dict:
        vectors = np.ascontiguousarray(emb.embeddings, dtype=np.float32)
        rows = np.ascontiguousarray(emb.rows, dtype=ROW_DTYPE)
        if vectors.ndim != 2 or len(rows) and (rows["emb"].min() < 0 or rows["emb"].max() >= len(vectors)):
            raise InputError("embeddings must be (n, D) and every row must point at one of them")
        self.folder.mkdir(parents=True, exist_ok=True)
        shards = {kind: _save_npy(self.folder / f"{content}.{kind}.npy", arr)
                  for kind, arr in (("emb", vectors), ("rows", rows))}
        return {"content": content, "embeddings": int(vectors.shape[0]), "dim": int(vectors.shape[1]),
                "rows": int(len(rows)), "num_slices": int(emb.num_slices), "segments": emb.segments,
                "shards": shards}

    def _load_entry(self, entry: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """Both shards of a case, memory-mapped and checked; None (with a warning) when damaged."""
        try:
            vectors = self._load_shard(entry["shards"]["emb"])
            rows = self._load_shard(entry["shards"]["rows"])
            if (vectors.dtype != np.float32 or vectors.shape != (entry["embeddings"], entry["dim"])
                    or rows.dtype != ROW_DTYPE or rows.shape != (entry["rows"],)):
                raise ValueError("unexpected shape or type")
            if len(rows) and (rows["emb"].min() < 0 or rows["emb"].max() >= len(vectors)):
                raise ValueError("rows point outside the embeddings")
            return vectors, rows
        except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            name, why = entry.get("labels", entry.get("content")), (str(exc).splitlines() or [""])[0][:120]
            self._warnings.add("library index: damaged shards, their cases embedded again", str(name),
                               f"library index: a shard of {name} is damaged ({why}); embedding the case again")
            return None

    def _load_shard(self, meta: dict) -> np.ndarray:
        path = self.folder / meta["file"]
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) != (meta["size"], meta["mtime_ns"]) and file_digest(path) != meta["sha256"]:
            raise ValueError(f"{path.name} changed since it was written")
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def _remove_orphans(self, cases: dict) -> None:
        keep = {s["file"] for e in cases.values() for s in e["shards"].values()} | {MANIFEST}
        for path in self.folder.glob("*"):
            if path.name not in keep and path.is_file() and not path.name.startswith("."):
                path.unlink(missing_ok=True)

    @classmethod
    def existing(cls, root: Path) -> list[EmbeddingIndex]:
        """The indexes stored under ``root`` (any feature configuration), for inspection."""
        found = []
        for manifest in sorted(Path(root).glob(f"*/{MANIFEST}")):
            try:
                cfg = json.loads(manifest.read_text(encoding="utf-8"))["config"]
                config = IndexConfig(str(cfg["features"]), str(cfg["plane"]), dict(cfg["normalization"]))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("library index: %s is unreadable", manifest)
                continue
            if config.id == manifest.parent.name:
                found.append(cls(Path(root), config))
        return found

    def describe(self, cases: Sequence[LibraryCase]) -> dict:
        """What is indexed and what a sync would do, judged by file size and mtime only (no hashing)."""
        manifest = self.read_manifest()
        entries, files = manifest["cases"], manifest["files"]
        status = {"current": 0, "changed": 0, "new": 0}
        for case in cases:
            if case.id not in entries:
                status["new"] += 1
            else:
                same = all(_same_stat(files.get(str(Path(f).resolve())), f) for f in case.files)
                status["current" if same else "changed"] += 1
        merged = merge_segments([e["segments"] for e in entries.values()])
        counts = Counter(int(seg["value"]) for e in entries.values() for seg in e["segments"])
        return {"folder": str(self.folder), "config": self.config.as_dict(), "cases_indexed": len(entries),
                "removed": len(set(entries) - {c.id for c in cases}), **status,
                "embeddings": sum(e["embeddings"] for e in entries.values()),
                "rows": sum(e["rows"] for e in entries.values()),
                "structures": [{"value": v, "name": merged[v].name, "cases": counts[v]} for v in sorted(counts)],
                "size_bytes": self.size_bytes()}

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*") if p.is_file()) if self.folder.is_dir() else 0


def _same_stat(known, path: Path) -> bool:
    try:
        st = Path(path).stat()
    except OSError:
        return False
    return isinstance(known, dict) and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns


def _save_npy(path: Path, array: np.ndarray) -> dict:
    """Atomically: a reader (or a crash) never sees half a shard."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    st = path.stat()
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_digest(path)}


# -------------------------------------------------------------------------------------- search


@dataclass
class TopK:
    """Per query slice, the best stored rows of one structure: (Nq, k) row ids, cosines, in-window flags."""

    rows: np.ndarray
    similarity: np.ndarray
    in_window: np.ndarray


@dataclass
class IndexData:
    """The whole index in memory: one (N, D) unit-vector matrix and the rows that point into it."""

    matrix: torch.Tensor
    rows: np.ndarray  # ROW_DTYPE, "emb" indexing ``matrix``
    case_of_row: np.ndarray  # (M,) index into case_ids
    case_ids: list[str]
    segments: dict[int, Segment]
    _keys: dict = field(default_factory=dict, repr=False)  # cached: label values; per value its rows and keys

    @classmethod
    def from_shards(cls, parts: Sequence[tuple[str, dict, tuple[np.ndarray, np.ndarray]]]) -> IndexData:
        dims = {e["dim"] for _, e, _ in parts}
        if len(dims) > 1:
            raise InputError(f"the index mixes embedding sizes {sorted(dims)}: rebuild it")
        dim = dims.pop() if dims else 0
        total = sum(len(v) for _, _, (v, _) in parts)
        matrix = np.empty((total, dim), dtype=np.float32)
        rows, case_of_row, offset = [], [], 0
        for n, (_, _, (vectors, case_rows)) in enumerate(parts):
            matrix[offset : offset + len(vectors)] = vectors  # reads the memory-mapped shard
            shifted = np.array(case_rows, dtype=ROW_DTYPE)
            shifted["emb"] += offset
            rows.append(shifted)
            case_of_row.append(np.full(len(shifted), n, dtype=np.int32))
            offset += len(vectors)
        tensor = F.normalize(torch.from_numpy(matrix), dim=1) if total else torch.zeros((0, dim))
        rows = np.concatenate(rows) if rows else np.zeros(0, ROW_DTYPE)
        named = [e["segments"] for _, e, _ in parts]
        unnamed = sorted(set(int(v) for v in np.unique(rows["value"])) - {int(s["value"]) for n in named for s in n})
        segments = merge_segments(named + [segments_json(default_segments(unnamed))])
        return cls(tensor, rows, np.concatenate(case_of_row) if case_of_row else np.zeros(0, np.int32),
                   [cid for cid, _, _ in parts], segments)

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def structures(self) -> list[int]:
        if "values" not in self._keys:
            self._keys["values"] = sorted(int(v) for v in np.unique(self.rows["value"]))
        return list(self._keys["values"])

    def search(self, query: torch.Tensor, k: int, structures: Sequence[int] | None = None,
               query_positions: np.ndarray | None = None, window: float | None = None,
               position_field: str = "position") -> dict[int, TopK]:
        """Cosine top-k per structure for every query vector; with ``window``, rows whose relative
        position differs by more than it rank after all those within it."""
        if k < 1:
            raise InputError(f"top-k must be at least 1, got {k}")
        if query.ndim != 2 or query.shape[1] != self.matrix.shape[1]:
            raise InputError(f"query embeddings {tuple(query.shape)} do not fit the index ({self.matrix.shape[1]}-D)")
        if window is not None and query_positions is None:
            raise InputError("a position window needs the query slices' positions")
        q = F.normalize(query.float(), dim=1)
        values = self.structures if structures is None else [int(v) for v in structures]
        out = {}
        for v in values:
            out[v] = self._top_k(q, v, k, query_positions, window, position_field)
        return out

    def _structure(self, value: int) -> tuple[np.ndarray, torch.Tensor]:
        """A structure's row ids and its (n, D) key matrix (the full matrix itself when it covers it)."""
        cached = self._keys.get(value)
        if cached is None:
            row_ids = np.flatnonzero(self.rows["value"] == value)
            if row_ids.size == 0:
                raise InputError(f"the library has no slice of label {value}")
            cols = self.rows["emb"][row_ids]
            whole = len(cols) == len(self.matrix) and np.array_equal(cols, np.arange(len(cols)))
            keys = self.matrix if whole else self.matrix.index_select(0, torch.from_numpy(cols))
            cached = self._keys[value] = (row_ids, keys)
        return cached

    def _top_k(self, q, value, k, query_positions, window, position_field) -> TopK:
        row_ids, keys = self._structure(value)
        k = min(k, len(row_ids))
        if window is not None:
            lib_pos = torch.from_numpy(self.rows[position_field][row_ids].astype(np.float32))
        idx, sims, inside = [], [], []
        for start in range(0, q.shape[0], QUERY_CHUNK):
            sim = q[start : start + QUERY_CHUNK] @ keys.T
            score = sim
            if window is not None:
                qp = torch.as_tensor(np.asarray(query_positions, np.float32)[start : start + QUERY_CHUNK])
                score = sim - OUTSIDE_WINDOW * ((qp[:, None] - lib_pos[None, :]).abs() > window)
            top = torch.topk(score, k=k, dim=1)
            idx.append(top.indices)
            sims.append(torch.gather(sim, 1, top.indices))
            inside.append(top.values > -1.0 - 1e-6)
        return TopK(row_ids[torch.cat(idx).numpy()], torch.cat(sims).numpy(), torch.cat(inside).numpy())


def merge_segments(per_case: Sequence[Sequence[dict]]) -> dict[int, Segment]:
    """One segment per label value over all cases: the first name given wins, a named one over label_N."""
    chosen: dict[int, Segment] = {}
    with RepeatedWarnings(log) as warnings:
        for segments in per_case:
            for item in segments:
                seg = Segment(int(item["value"]), str(item["name"]), tuple(item["color"]), item.get("terminology"))
                known = chosen.get(seg.value)
                if known is None or (_is_default(known) and not _is_default(seg)):
                    chosen[seg.value] = seg
                elif known.name != seg.name and not _is_default(seg):
                    warnings.add("library: label values named differently in different cases (the first name is "
                                 "used)", f"{seg.value} '{known.name}'/'{seg.name}'",
                                 f"library: label {seg.value} is '{known.name}' in one case and '{seg.name}' in "
                                 f"another; using '{known.name}'")
        return _unique_segment_names(chosen, warnings)


def _unique_segment_names(chosen: dict[int, Segment], warnings: RepeatedWarnings) -> dict[int, Segment]:
    """A name two label values share: the later value's segment is renamed '<name>_<value>'."""
    names: set[str] = set()
    out = {}
    for value in sorted(chosen):
        seg = chosen[value]
        if seg.name in names:
            warnings.add("library: names used by several label values (each later value is renamed "
                         "'<name>_<value>')", f"'{seg.name}' (label {value})",
                         f"library: the name '{seg.name}' is used by two label values; label {value} is "
                         f"'{seg.name}_{value}'")
            seg = Segment(value, f"{seg.name}_{value}", seg.color, seg.terminology)
        names.add(seg.name)
        out[value] = seg
    return out


def _is_default(seg: Segment) -> bool:
    return seg.name == default_segments([seg.value])[0].name


def segments_json(segments) -> list[dict]:
    return [{"value": s.value, "name": s.name, "color": [float(c) for c in s.color], "terminology": s.terminology}
            for s in segments]
