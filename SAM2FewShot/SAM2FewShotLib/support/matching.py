"""Per-slice dynamic matching: for every query slice, the most similar support entries.

A support entry is an (augmented) support slice with one structure's mask. Each query slice gets,
per structure, its best entries by cosine similarity, optionally pulled towards entries from the
same relative position in the structure (a soft prior: a top slice of an organ rarely looks like
its middle, even when the intensities correlate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..common.errors import InputError
from .features import cosine_matrix

ALL = 0  # the structure key when entries are not split by structure (0 is never a label value)


@dataclass
class Matches:
    """Per structure value: (Nq, k) entry indices best first, their cosine and their score."""

    entries: dict[int, np.ndarray]
    similarity: dict[int, np.ndarray]
    score: dict[int, np.ndarray]  # similarity - position_weight * |position difference|

    def best(self, structure: int = ALL) -> np.ndarray:
        """(Nq,) index of the best entry of ``structure`` for every query slice."""
        return self.entries[structure][:, 0]


def match_slices(
    query_emb: torch.Tensor,
    support_emb: torch.Tensor,
    query_positions: np.ndarray | None = None,
    support_positions: np.ndarray | None = None,
    position_weight: float = 0.0,
    structure_ids: np.ndarray | None = None,
    top_k: int = 1,
) -> Matches:
    """Rank support entries for every query slice, per structure when ``structure_ids`` is given.

    score = cosine - position_weight * |query position - support position|; positions are
    relative (0 at the structure's first slice, 1 at its last; see ``relative_positions``).
    A structure with fewer than ``top_k`` entries gets all of them.
    """
    sim = cosine_matrix(query_emb, support_emb)
    nq, ns = sim.shape
    if ns == 0:
        raise InputError("there are no support entries to match against")
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")
    score = sim
    if position_weight:
        if query_positions is None or support_positions is None:
            raise InputError("a position weight needs both query and support positions")
        qp = torch.as_tensor(np.asarray(query_positions, dtype=np.float32)).reshape(-1)
        sp = torch.as_tensor(np.asarray(support_positions, dtype=np.float32)).reshape(-1)
        if qp.numel() != nq or sp.numel() != ns:
            raise InputError(f"positions ({qp.numel()}, {sp.numel()}) must match the embeddings ({nq}, {ns})")
        score = sim - float(position_weight) * (qp[:, None] - sp[None, :]).abs()
    if structure_ids is None:
        groups = {ALL: torch.arange(ns)}
    else:
        ids = np.asarray(structure_ids).reshape(-1)
        if ids.size != ns:
            raise InputError(f"{ids.size} structure ids for {ns} support entries")
        groups = {int(v): torch.from_numpy(np.flatnonzero(ids == v)) for v in np.unique(ids)}
    out = Matches({}, {}, {})
    for value, cols in groups.items():
        top = torch.topk(score[:, cols], k=min(top_k, cols.numel()), dim=1)
        entries = cols[top.indices]
        out.entries[value] = entries.numpy()
        out.score[value] = top.values.numpy()
        out.similarity[value] = torch.gather(sim, 1, entries).numpy()
    return out


def relative_positions(count: int, start: int | None = None, end: int | None = None) -> np.ndarray:
    """Query slice indices mapped to 0 at ``start`` and 1 at ``end`` (the whole volume by default).

    Slices outside the range fall below 0 or above 1, so the prior keeps pushing them outwards.
    """
    start = 0 if start is None else int(start)
    end = count - 1 if end is None else int(end)
    idx = np.arange(count, dtype=np.float32)
    if end < start:
        raise InputError(f"slice range end {end} is before its start {start}")
    if end == start:  # a one-slice range sits at 0.5, like a one-slice support structure
        return (idx - start + 0.5).astype(np.float32)
    return (idx - start) / float(end - start)
