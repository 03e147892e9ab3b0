"""Box and point prompts given in a JSON file, in voxel (i, j, k) coordinates of the query.

{"prompts": [{"label": 1, "box_ijk": [[i0, j0, k], [i1, j1, k]]},
             {"label": 2, "points_ijk": [[i, j, k], ...], "point_labels": [1, 0]}]}
All corners and points of one prompt must lie on one slice of the slicing axis.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import InputError
from .propagation import Prompt


def _to_slice(ijk: np.ndarray, axis: int, what: str) -> tuple[int, np.ndarray]:
    """(frame, (P, 2) x/y in slice pixels) for IJK points; axis is a numpy axis of (k, j, i)."""
    kji = ijk[:, ::-1]
    frames = np.unique(kji[:, axis])
    if len(frames) != 1:
        raise InputError(f"{what}: all its points must lie on one slice along the slicing axis")
    rows_cols = np.delete(kji, axis, axis=1)  # (row, col) of the slice array
    return int(frames[0]), rows_cols[:, ::-1].astype(np.float32)  # x = column, y = row


def read_prompts_file(path: str | Path, axis: int, shape_kji: tuple[int, int, int]) -> list[Prompt]:
    try:
        data = json.loads(Path(path).read_text())
        entries = data["prompts"]
    except FileNotFoundError:
        raise InputError(f"prompts file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"prompts file {path} is not valid: {exc}") from None
    prompts = []
    for n, e in enumerate(entries):
        what = f"prompt {n} in {Path(path).name}"
        try:
            label = int(e["label"])
            box = np.asarray(e["box_ijk"], dtype=float) if "box_ijk" in e else None
            pts = np.asarray(e["points_ijk"], dtype=float) if "points_ijk" in e else None
            pl = np.asarray(e.get("point_labels", [1] * (0 if pts is None else len(pts))), dtype=np.int32)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{what} is not valid: {exc}") from None
        if label <= 0 or (box is None and pts is None):
            raise InputError(f"{what} needs a positive label and a box_ijk or points_ijk")
        allp = np.concatenate([a for a in (box, pts) if a is not None]).reshape(-1, 3)
        if (allp < 0).any() or (allp[:, ::-1] > np.asarray(shape_kji) - 1).any():
            raise InputError(f"{what} lies outside the volume")
        frame, xy = _to_slice(allp, axis, what)
        nbox = 0 if box is None else 2
        prompts.append(Prompt(
            frame=frame, obj_id=label,
            box=None if box is None else tuple(np.concatenate([xy[:2].min(0), xy[:2].max(0)]).tolist()),
            points=None if pts is None else xy[nbox:],
            point_labels=None if pts is None else pl,
        ))
    return prompts
