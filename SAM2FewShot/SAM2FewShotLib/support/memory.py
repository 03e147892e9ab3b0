"""Support images with masks as SAM2 conditioning memories, chosen per query slice.

Each support entry (an augmented support slice and one structure's mask) is encoded once as a
mask-prompted conditioning frame; the policy then hands each query slice the memories of its
best-matching entries. Three schemes:
  pair          a 2-frame video per query slice: its matched support, then the slice itself;
  video         the query as one video, conditioned by the matched supports of the slice and its
                neighbours (no memory of the query's own predictions);
  video+memory  video, plus SAM2's temporal memory of neighbouring query predictions, both ways.
Where the memories sit in the video (placement) and how the passes sweep it are settings too, so
that published constructions are reproduced exactly (methods/presets.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..common.choices import PASS_ORDERS, PLACEMENTS, SCHEMES
from ..common.errors import InputError
from ..sam2.conditioning import MemoryPolicy
from .matching import Matches


@dataclass
class SupportEntries:
    """Support images (M, H, W) in [0, 1] with one structure's mask each, and what they are."""

    images01: torch.Tensor
    masks: torch.Tensor  # (M, H, W) bool
    structure: np.ndarray  # (M,) label value of the structure the mask shows
    meta: list[dict] = field(default_factory=list)  # per entry: case, slice, augmentation, position

    def __len__(self) -> int:
        return int(self.images01.shape[0])


class SupportMemoryPolicy(MemoryPolicy):
    """Conditions every query slice on the memories of its matched support entries."""

    def __init__(self, support: SupportEntries, matches: Matches, num_query: int,
                 scheme: str = "video+memory", neighbours: int = 1, max_memories: int = 3,
                 placement: str = "behind", passes: str = "both",
                 frame_range: tuple[int, int] | None = None):
        if scheme not in SCHEMES:
            raise InputError(f"unknown scheme '{scheme}': use one of {', '.join(SCHEMES)}")
        if placement not in PLACEMENTS:
            raise InputError(f"unknown placement '{placement}': use one of {', '.join(PLACEMENTS)}")
        if passes not in PASS_ORDERS:
            raise InputError(f"unknown pass order '{passes}': use one of {', '.join(PASS_ORDERS)}")
        self.support, self.matches, self.n = support, matches, num_query
        self.scheme = scheme
        self.temporal = scheme == "video+memory"
        self.neighbours = 0 if scheme == "pair" else int(neighbours)
        self.max_memories = 1 if scheme == "pair" else int(max_memories)
        self.placement, self.passes = placement, passes
        self.lo, self.hi = frame_range if frame_range is not None else (0, num_query - 1)
        self.obj_ids = tuple(sorted(matches.entries))
        self.state: dict | None = None  # the inference state the entries were added to

    def prepare(self, predictor, state: dict) -> None:
        """Every entry some query slice uses becomes a mask-prompted conditioning frame of its
        structure's object, added as stock sam2 adds a mask (``add_new_mask``; the memory is encoded
        when propagation starts): support frames follow the query's in the stacked cache."""
        self.state = state
        for value in self.obj_ids:
            for m in np.unique(self.matches.entries[value]):
                predictor.add_new_mask(state, self.n + int(m), value, self.support.masks[int(m)])

    def output(self, obj_idx: int, entry: int) -> dict:
        """The conditioning output of one support entry (encoded by sam2's propagation preflight)."""
        return self.state["output_dict_per_obj"][obj_idx]["cond_frame_outputs"][self.n + entry]

    def chosen(self, obj_idx: int, frame: int) -> list[int]:
        """Entries conditioning this slice: its own best matches first, then its neighbours'."""
        ranked = self.matches.entries[self.obj_ids[obj_idx]]
        picks: list[int] = []
        order = [frame] + [frame + s * d for d in range(1, self.neighbours + 1) for s in (-1, 1)]
        for rank in range(ranked.shape[1]):
            for t in order:
                if 0 <= t < self.n and int(ranked[t, rank]) not in picks:
                    picks.append(int(ranked[t, rank]))
                if len(picks) == self.max_memories:
                    return picks
        return picks

    def placed(self, obj_idx: int, frame: int, reverse: bool) -> dict[int, int]:
        """Frame index -> support entry: where this slice's memories sit in the video, best first.

        behind: conditioning memories carry no temporal encoding; only object pointers do, and
        only from the past: so the supports sit just behind the slice in the tracking direction.
        before-query / after-query: at fixed frames before the first or after the last query
        slice, as FS-MedSAM2 and FATE-SAM build their videos.
        """
        chosen = self.chosen(obj_idx, frame)
        if self.placement == "before-query":
            return {self.lo - 1 - r: m for r, m in enumerate(chosen)}
        if self.placement == "after-query":
            return {self.hi + 1 + r: m for r, m in enumerate(chosen)}
        step = 1 if reverse else -1
        return {frame + step * (r + 1): m for r, m in enumerate(chosen)}

    def cond_outputs(self, obj_idx: int, frame: int, reverse: bool, prompts: dict) -> dict:
        return {t: self.output(obj_idx, m) for t, m in self.placed(obj_idx, frame, reverse).items()}

    def video_length(self, obj_idx: int, frame: int) -> int | None:
        k = len(self.chosen(obj_idx, frame))
        if not self.temporal:  # pair and video: each slice is its own short video, its supports then it
            return k + 1
        if self.placement == "behind":  # the query with every support entry after it: the state's own
            return None
        # The query range and its supports, as the published video. sam2 also stops its search for
        # memories at the video's end, so a range that starts beyond slice k keeps the state's length
        # (it differs only when that video is shorter than sam2's 16 object pointers).
        length = self.hi - self.lo + 1 + k
        return length if length > self.hi else None

    def describe(self, obj_idx: int, frame: int) -> dict | None:
        value = self.obj_ids[obj_idx]
        best = int(self.matches.entries[value][frame, 0])
        entry = dict(self.support.meta[best]) if self.support.meta else {}
        entry["support_entry"] = best
        similarity = float(self.matches.similarity[value][frame, 0])
        if np.isfinite(similarity):  # a fixed support has none
            entry["similarity"] = round(similarity, 4)
        entry["memories"] = self.chosen(obj_idx, frame)
        return entry
