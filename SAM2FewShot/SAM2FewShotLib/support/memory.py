"""Support images with masks as SAM2 conditioning memories, chosen per query slice.

Each support entry (an augmented support slice and one structure's mask) is encoded once as a
mask-prompted conditioning frame; the policy then hands each query slice the memories of its
best-matching entries. Three schemes:
  pair          a 2-frame video per query slice: its matched support, then the slice itself;
  video         the query as one video, conditioned by the matched supports of the slice and its
                neighbours (no memory of the query's own predictions);
  video+memory  video, plus SAM2's temporal memory of neighbouring query predictions, both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..common.choices import SCHEMES
from ..common.errors import InputError
from ..sam2.propagation import MemoryPolicy
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
                 scheme: str = "video+memory", neighbours: int = 1, max_memories: int = 3):
        if scheme not in SCHEMES:
            raise InputError(f"unknown scheme '{scheme}': use one of {', '.join(SCHEMES)}")
        self.support, self.matches, self.n = support, matches, num_query
        self.scheme = scheme
        self.temporal = scheme == "video+memory"
        self.neighbours = 0 if scheme == "pair" else int(neighbours)
        self.max_memories = 1 if scheme == "pair" else int(max_memories)
        self.obj_ids = tuple(sorted(matches.entries))
        self.outputs: dict[int, dict[int, dict]] = {}  # obj_idx -> entry -> conditioning output

    def prepare(self, predictor, state: dict) -> None:
        """Encode every entry some query slice uses as a mask-prompted conditioning frame."""
        for obj_idx, value in enumerate(self.obj_ids):
            od = state["output_dict_per_obj"][obj_idx]
            self.outputs[obj_idx] = {}
            for m in np.unique(self.matches.entries[value]):
                frame = self.n + int(m)  # support frames follow the query's in the stacked cache
                mask = self.support.masks[int(m)].float()[None, None].to(state["device"])
                size = predictor.image_size
                mask = (F.interpolate(mask, size=(size, size), mode="bilinear", align_corners=False,
                                      antialias=True) >= 0.5).float()
                out, _ = predictor._run_single_frame_inference(
                    inference_state=state, output_dict=od, frame_idx=frame, batch_size=1,
                    is_init_cond_frame=True, point_inputs=None, mask_inputs=mask, reverse=False,
                    run_mem_encoder=True,
                )
                self.outputs[obj_idx][int(m)] = out
                od["cond_frame_outputs"][frame] = out  # a conditioning frame of the state, as sam2 expects

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

    def cond_outputs(self, obj_idx: int, frame: int, reverse: bool, prompts: dict) -> dict:
        # Conditioning memories carry no temporal encoding; only object pointers do, and only
        # from the past: so the supports sit just behind the slice in the tracking direction.
        step = 1 if reverse else -1
        return {frame + step * (r + 1): self.outputs[obj_idx][m] for r, m in enumerate(self.chosen(obj_idx, frame))}

    def describe(self, obj_idx: int, frame: int) -> Optional[dict]:
        value = self.obj_ids[obj_idx]
        best = int(self.matches.entries[value][frame, 0])
        entry = dict(self.support.meta[best]) if self.support.meta else {}
        entry["support_entry"] = best
        entry["similarity"] = round(float(self.matches.similarity[value][frame, 0]), 4)
        entry["memories"] = self.chosen(obj_idx, frame)
        return entry
