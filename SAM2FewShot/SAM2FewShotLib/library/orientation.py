"""Library slices as the query sees them: one in-plane convention in the index, the query's frame in SAM2's memory.

The index (index.py) holds one set of vectors per plane for every query. A case stored flipped, transposed
(RAS vs LPS, another axis order) would give mirrored or transposed pictures of the same anatomy, and
rank against queries as a different slice. So every slice is embedded in one convention, SLICES:

- orientation: its rows and columns run along the plane's LPS axes in LPS order and sense (io/slice_frame's
  ``lps_frame``: axial rows P, columns L); the nearest such turn (a transpose and flips, a view of the
  array, never an interpolation) is taken, so a case oblique in the plane stays as rotated as it is;
- spacing: none is imposed. Every extractor stretches a slice's field of view, whatever its pixel grid,
  onto its fixed square input (sam2/frames.model_input): the same physical slice at 0.5 mm or at 1 mm (or
  with non-square pixels) gives the same input up to interpolation, and resampling first would only add a
  second interpolation (and, for the query, an encoder pass the propagation cannot reuse).

The query is embedded in the same convention: as it is stored (the encoder features propagation reuses)
when its slices already follow it, else turned, at the price of one more embedding of its slices.
Retrieved slices are then brought into the query's frame, its in-plane axes and spacing, as matched support
brings its supports (io/reorient.py), before they become SAM2 memories.
"""

from __future__ import annotations

import numpy as np
import torch

from ..common.progress import ProgressFn
from ..io.slice_frame import SliceFrame, Turn, into_frame, lps_frame, slice_frame, turn_between, turned
from ..io.slicing import anatomical_plane
from ..io.volume import Volume
from ..sam2.session import VolumeSession
from ..support.features import FeatureExtractor

SLICES = "lps-order-and-sense:field-of-view"  # the convention's name, part of the index config
QUERY_CHUNK = 64  # query slices turned and embedded at a time: bounds the float copy


def canonical_slices(stack: np.ndarray, volume: Volume, axis: int, plane: str) -> np.ndarray:
    """(N, H, W) slices of ``volume`` along ``axis`` (numpy order) in the index's convention: a view."""
    return turned(stack, turn_between(slice_frame(volume, axis), lps_frame(plane)))


def _query_turn(session: VolumeSession) -> Turn:
    """What brings the query's slices into the index's convention."""
    plane = anatomical_plane(session.volume, session.axis)
    return turn_between(slice_frame(session.volume, session.axis), lps_frame(plane))


def query_follows_convention(session: VolumeSession) -> bool:
    """Whether the query's own slices are already in the index's convention (their features then serve both)."""
    return _query_turn(session).identity


def embed_turned_query(session: VolumeSession, extractor: FeatureExtractor,
                       progress: ProgressFn | None = None) -> torch.Tensor:
    """(N, D): the query's slices turned into the index's convention and embedded, a chunk at a time."""
    turn = _query_turn(session)
    slices01, total = session.frames.slices01, session.num_slices
    out = []
    for start in range(0, total, QUERY_CHUNK):
        chunk = torch.as_tensor(slices01[start : start + QUERY_CHUNK]).numpy()
        out.append(extractor.embed(torch.from_numpy(np.ascontiguousarray(turned(chunk, turn)))))
        if progress:
            progress(session.cache.stage, min(total, start + QUERY_CHUNK), total)
    return torch.cat(out)


def into_query_frame(images01: np.ndarray, labels: np.ndarray, case: Volume, axis: int,
                     target: SliceFrame) -> tuple[np.ndarray, np.ndarray, bool]:
    """(N, H, W) image and label slices of ``case`` along ``axis`` with the query's in-plane axes and
    spacing (linear for the image, nearest for the labels), and whether that changed them (turned or resampled)."""
    own = slice_frame(case, axis)
    image = into_frame(images01, own, target, linear=True)
    return image, into_frame(labels, own, target, linear=False), image is not images01
