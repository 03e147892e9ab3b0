"""Retrieval's part in the library: the library slices most like each query slice, and those slices as
the support entries that condition SAM2 (methods/retrieval.py hands them to the memory-conditioned pipeline).

Each query slice retrieves its top-k library slices per structure by cosine of their embeddings (the
on-disk index, library/index.py); only the retrieved slices of the retrieved cases are ever read. Both
sides are embedded in one in-plane convention, and the retrieved slices reach SAM2 in the query's frame
(library/orientation.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ..common.progress import ProgressFn
from ..io.normalization import Normalization
from ..io.slice_frame import slice_frame
from ..io.slicing import slicing_axis
from ..sam2.frames import VolumeSlices
from ..sam2.session import VolumeSession
from ..support.matching import Matches, relative_positions
from ..support.memory import SupportEntries
from ..support.slices import SupportSlice, stack_support
from .cases import Library
from .index import IndexData, TopK
from .orientation import embed_turned_query, into_query_frame, query_follows_convention
from .sync import LibraryFeatures


def query_embeddings(session: VolumeSession, features: LibraryFeatures,
                     progress: ProgressFn | None = None) -> torch.Tensor:
    """The query's slices embedded in the index's in-plane convention. sam2, for a query whose slices follow it:
    the session's cached encoder embeddings (propagation reuses the encoding); else the extractor's."""
    if not query_follows_convention(session):
        return embed_turned_query(session, features.extractor, progress)
    if features.name == "sam2":
        return session.cache.embed_all(progress=progress)
    return features.extractor.embed(session.frames.slices01)


def retrieve(session: VolumeSession, data: IndexData, query: torch.Tensor, top_k: int, window: float | None,
             neighbours: int, frame_range: tuple[int, int] | None = None) -> dict[int, TopK]:
    """Top-k library rows per structure for every query slice.

    Positions for the window: without a slice range, a slice's place in its volume (both sides);
    with one, the query range maps to 0..1 and is compared with the place within the structure.
    """
    positions = relative_positions(session.num_slices, *(frame_range or (None, None)))
    field_name = "extent_position" if frame_range else "position"
    hits = data.search(query, top_k, None, positions, window, field_name)
    if frame_range is not None:  # slices nobody visits borrow a visited one's rows: nothing extra to load
        lo, hi = max(0, frame_range[0] - neighbours), min(session.num_slices - 1, frame_range[1] + neighbours)
        clamp = np.clip(np.arange(session.num_slices), lo, hi)
        hits = {v: TopK(h.rows[clamp], h.similarity[clamp], h.in_window[clamp]) for v, h in hits.items()}
    return hits


def conditioning_entries(library: Library, data: IndexData, hits: dict[int, TopK], session: VolumeSession,
                         plane: str, normalization: Normalization) -> tuple[SupportEntries, Matches]:
    """The retrieved slices as support entries, in the query's in-plane axes and spacing (only those slices
    of only those cases are read)."""
    needed = np.unique(np.concatenate([h.rows.ravel() for h in hits.values()]))
    entry_of = {int(r): e for e, r in enumerate(needed)}
    by_case: dict[int, list[int]] = {}
    for r in needed:
        by_case.setdefault(int(data.case_of_row[r]), []).append(int(r))
    target = slice_frame(session.volume, session.axis)
    picked: dict[int, SupportSlice] = {}
    reoriented: set[int] = set()
    for case_no, rows in by_case.items():
        image, labels = library.case(data.case_ids[case_no]).load()
        axis = slicing_axis(image, plane)
        wanted = sorted({int(data.rows[r]["slice"]) for r in rows})
        at = {s: n for n, s in enumerate(wanted)}
        image01 = VolumeSlices(image.array, axis, normalization)[wanted].numpy()  # only these are normalised
        lab = np.moveaxis(labels.volume.array, axis, 0)[wanted]
        image01, lab, moved = into_query_frame(image01, lab, image, axis, target)
        if moved:
            reoriented.add(case_no)
        for r in rows:
            row = data.rows[r]
            s, v = int(row["slice"]), int(row["value"])
            picked[r] = SupportSlice(case_no, v, data.segments[v].name, s, float(row["extent_position"]),
                                     np.ascontiguousarray(image01[at[s]]), lab[at[s]] == v)
    ordered = [picked[int(r)] for r in needed]
    images, masks = stack_support(ordered, (session.frames.height, session.frames.width))
    meta = [{"library_case": data.case_ids[p.case], "library_slice": p.index, "relative_position": round(p.position, 4),
             "library_reoriented": p.case in reoriented} for p in ordered]
    entries = SupportEntries(images, masks, np.array([p.value for p in ordered]), meta)
    to_entry = np.vectorize(lambda r: entry_of[int(r)], otypes=[np.int64])
    matches = Matches({v: to_entry(h.rows) for v, h in hits.items()},
                      {v: h.similarity for v, h in hits.items()},
                      {v: np.where(h.in_window, h.similarity, h.similarity - 4.0) for v, h in hits.items()})
    return entries, matches


def add_retrievals(report: dict, data: IndexData, hits: dict[int, TopK]) -> None:
    """Per query slice and structure: every retrieved case, slice and cosine, best first."""
    for entry in report["slices"]:
        t = entry["slice"]
        for v, h in hits.items():
            obj = entry["objects"].setdefault(data.segments[v].name, {"value": v})
            obj["retrieved"] = [
                {"case": data.case_ids[int(data.case_of_row[r])], "slice": int(data.rows[r]["slice"]),
                 "similarity": round(float(s), 4), "in_window": bool(w)}
                for r, s, w in zip(h.rows[t], h.similarity[t], h.in_window[t], strict=True)]
