"""What a library index's manifest may hold: each case entry checked before any reader uses it, so a
damaged or hand-edited manifest is rebuilt with a warning, never a KeyError or TypeError."""

from __future__ import annotations

from pathlib import Path


def valid_entry(entry) -> bool:
    """A case entry every reader of the manifest can use without a KeyError or TypeError: anything
    else makes the manifest damaged (rebuilt with a warning), never a traceback."""
    return (isinstance(entry, dict) and isinstance(entry.get("content"), str)
            and isinstance(entry.get("shards"), dict) and {"emb", "rows"} <= set(entry["shards"])
            and all(_valid_shard(meta) for meta in entry["shards"].values())
            and all(_is_int(entry.get(k)) for k in ("embeddings", "dim", "rows", "num_slices"))
            and isinstance(entry.get("segments"), list) and all(_valid_segment(s) for s in entry["segments"]))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_shard(meta) -> bool:
    name = meta.get("file") if isinstance(meta, dict) else None
    return (isinstance(name, str) and name == Path(name).name and not name.startswith(".")  # a file of the index
            and isinstance(meta.get("sha256"), str) and _is_int(meta.get("size")) and _is_int(meta.get("mtime_ns")))


def _valid_segment(item) -> bool:
    color = item.get("color") if isinstance(item, dict) else None
    return (isinstance(item, dict) and _is_int(item.get("value")) and isinstance(item.get("name"), str)
            and isinstance(color, list) and len(color) == 3
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in color)
            and isinstance(item.get("terminology"), (str, type(None))))
