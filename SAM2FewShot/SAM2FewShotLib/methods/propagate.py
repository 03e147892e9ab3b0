"""The propagate method: the user's masks (and boxes, points) on some slices, propagated through the volume.

Masks come from a label file on the query's grid (every slice with voxels of a label is a mask
prompt); boxes and points from a JSON file in voxel (i, j, k) coordinates of the query::

    {"prompts": [{"label": 1, "box_ijk": [[i0, j0, k], [i1, j1, k]]},
                 {"label": 2, "points_ijk": [[i, j, k], ...], "point_labels": [1, 0]}]}

All corners and points of one prompt must lie on one slice of the slicing axis. A label file without
voxels alongside a prompts file gives the segments' names and colours only (the panel's points and boxes).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..common.context import RunContext
from ..common.errors import InputError
from ..io.volume import MAX_LABEL, LabelMap, default_segments
from ..sam2.conditioning import Prompt
from .common import MethodInputs, build_report

if TYPE_CHECKING:
    from ..sam2.session import VolumeSession


@dataclass(frozen=True)
class Params:
    """Propagate is conditioned by the request's prompts; ``mask_slices`` says which slices of the
    prompt label file are mask prompts, per label: "1:3,10;2:5" (label 1 on slices 3 and 10, label 2
    on slice 5). A listed slice without voxels of its label is a prompt too: the structure is absent
    there (a refine, after the user erased a leak). Default: every slice with voxels of a label.
    ``slice_bounds`` limits labels to a range of slices, "1:10-20;2:5-9" (a Markups ROI's extent in the
    panel): no voxel of the label outside it, and when every prompted label has one, propagation runs
    over their union only."""

    mask_slices: str = ""
    slice_bounds: str = ""

    def check(self) -> None:
        parse_mask_slices(self.mask_slices)
        parse_slice_bounds(self.slice_bounds)


OPTIONS = ()  # conditioned by the request's prompts (--prompt-labels, --prompts, --labels), not by options


def parse_mask_slices(text: str) -> dict[int, list[int]] | None:
    """"1:3,10;2:5" -> {1: [3, 10], 2: [5]}; "" -> None (every slice with voxels)."""
    if not text.strip():
        return None
    chosen: dict[int, list[int]] = {}
    for part in text.split(";"):
        label, _, slices = part.partition(":")
        try:
            value = int(label)
            chosen[value] = sorted({int(t) for t in slices.split(",") if t.strip()})
        except ValueError:
            raise InputError(f"mask_slices '{text}' is not 'label:slice,slice;label:slice'") from None
        if value < 1 or not chosen[value] or min(chosen[value]) < 0:
            raise InputError(f"mask_slices '{text}': labels are 1 or more, with slices 0 or more")
    return chosen


def parse_slice_bounds(text: str) -> dict[int, tuple[int, int]] | None:
    """"1:10-20;2:5" -> {1: (10, 20), 2: (5, 5)}; "" -> None (no bounds)."""
    if not text.strip():
        return None
    bounds: dict[int, tuple[int, int]] = {}
    for part in text.split(";"):
        label, _, span = part.partition(":")
        first, _, last = span.partition("-")
        try:
            value, a, b = int(label), int(first), int(last or first)
        except ValueError:
            raise InputError(f"slice_bounds '{text}' is not 'label:first-last;label:first-last'") from None
        if value < 1 or a < 0 or b < a or value in bounds:
            raise InputError(f"slice_bounds '{text}': one range per label (1 or more), first <= last, from slice 0")
        bounds[value] = (a, b)
    return bounds


def run(inputs: MethodInputs, params: Params) -> tuple[LabelMap, dict]:
    """Masks from the prompt label file, boxes and points from the prompts file, all propagated at once."""
    session = inputs.session
    prompts, segments = [], []
    if inputs.prompt_labels is not None:
        if inputs.prompt_labels.volume.array.any() or not inputs.prompts:  # else: names for boxes and points
            prompts += prompts_from_labels(session, inputs.prompt_labels, inputs.values,
                                           parse_mask_slices(params.mask_slices))
        segments = list(inputs.prompt_labels.segments)
    prompts += list(inputs.prompts)  # boxes and points, read before the model loaded
    known = {s.value for s in segments}
    segments += list(default_segments(sorted({p.obj_id for p in prompts} - known)))
    return segment_propagate(session, prompts, segments, inputs.context, parse_slice_bounds(params.slice_bounds))


def prompts_from_labels(session: VolumeSession, labels: LabelMap, values: Sequence[int] | None = None,
                        mask_slices: dict[int, list[int]] | None = None) -> list[Prompt]:
    """One mask prompt per label value and slice where the label file has voxels of it, or on the
    slices ``mask_slices`` lists for a label (an empty one says the structure is absent there)."""
    session.volume.require_same_grid(labels.volume, "prompt labels")
    slices = session.slices_of(labels.volume.array)
    present = [int(v) for v in np.unique(slices) if v != 0]
    if not present:
        raise InputError("the prompt label file has no labelled voxel")
    chosen = present if values is None else [int(v) for v in values]
    if mask_slices is not None:
        chosen = [v for v in chosen if v in mask_slices] if values is None else chosen
        absent = [v for v in chosen if v not in mask_slices]
        if absent:
            raise InputError(f"mask_slices names no slice for label {absent[0]}")
    for v in chosen:
        if v not in present:
            raise InputError(f"label value {v} does not exist in the prompt labels (values: {present})")
    prompts = []
    for v in chosen:
        hit = slices == v
        frames = np.flatnonzero(hit.any(axis=(1, 2))) if mask_slices is None else mask_slices[v]
        for t in frames:
            if not 0 <= t < len(slices):
                raise InputError(f"mask_slices: slice {t} is outside the query's {len(slices)} slices")
            prompts.append(Prompt(frame=int(t), obj_id=v, mask=hit[t], erased=not hit[t].any()))
    return prompts


def segment_propagate(session: VolumeSession, prompts: Sequence[Prompt], segments,
                      context: RunContext = RunContext(),
                      bounds: dict[int, tuple[int, int]] | None = None) -> tuple[LabelMap, dict]:
    """The label map on the query's grid and the per-slice report; ``bounds``: label -> its first and last
    slice (parse_slice_bounds)."""
    from ..sam2.propagation import propagate

    wanted = {p.obj_id for p in prompts}
    segments = [s for s in segments if s.value in wanted]
    missing = wanted - {s.value for s in segments}
    if missing:
        raise InputError(f"prompts name label values with no segment: {sorted(missing)}")
    if bounds:
        context = _bounded(context, prompts, bounds, session.num_slices)
    start = time.perf_counter()
    encoded_before = session.cache.encoded_frames
    result = propagate(session.predictor, session.frames, prompts, cache=session.cache, context=context,
                       bounds=bounds)
    labels = session.to_labelmap(result.labels, segments)
    report = build_report("propagate", session, result, segments, time.perf_counter() - start,
                          session.cache.encoded_frames - encoded_before)
    return labels, report


def _bounded(context: RunContext, prompts: Sequence[Prompt], bounds: dict[int, tuple[int, int]],
             num_slices: int) -> RunContext:
    """The run's context with its frame range narrowed to the union of the labels' bounds when every
    prompted label has one; InputError for a prompt outside its label's bounds."""
    for p in prompts:
        first, last = bounds.get(p.obj_id, (0, num_slices - 1))
        if not first <= p.frame <= last:
            raise InputError(f"label {p.obj_id} has a prompt on slice {p.frame}, outside its slice bounds "
                             f"{first}..{last}")
    if any(first >= num_slices for first, _ in bounds.values()):
        raise InputError(f"slice_bounds lie outside the query's {num_slices} slices")
    if not {p.obj_id for p in prompts} <= set(bounds):
        return context
    lo = min(first for first, _ in bounds.values())
    hi = min(max(last for _, last in bounds.values()), num_slices - 1)
    if context.frame_range is not None:
        lo, hi = max(lo, context.frame_range[0]), min(hi, context.frame_range[1])
    return dataclasses.replace(context, frame_range=(lo, hi)) if lo <= hi else context


def _to_slice(ijk: np.ndarray, axis: int, what: str) -> tuple[int, np.ndarray]:
    """(frame, (P, 2) x/y in slice pixels) for IJK points; axis is a numpy axis of (k, j, i)."""
    kji = ijk[:, ::-1]
    frames = np.unique(kji[:, axis])
    if len(frames) != 1:
        raise InputError(f"{what}: all its points must lie on one slice along the slicing axis")
    rows_cols = np.delete(kji, axis, axis=1)  # (row, col) of the slice array
    return int(frames[0]), rows_cols[:, ::-1].astype(np.float32)  # x = column, y = row


def read_prompts_file(path: str | Path, axis: int, shape_kji: tuple[int, int, int]) -> list[Prompt]:
    """Box and point prompts from a JSON file; every problem with it is one line that names the prompt."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the prompts file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise InputError(f"the prompts file {path} is not valid JSON: {str(exc)[:120]}") from None
    entries = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"the prompts file {path} holds no prompts: expected {{\"prompts\": [{{\"label\": 1, "
                         "\"box_ijk\": [[i0, j0, k], [i1, j1, k]]}, ...]}")
    return [_prompt(e, f"prompt {n} in {path.name}", axis, shape_kji) for n, e in enumerate(entries)]


def _prompt(entry, what: str, axis: int, shape_kji: tuple[int, int, int]) -> Prompt:
    if not isinstance(entry, dict):
        raise InputError(f"{what} is not an object with a label and a box_ijk or points_ijk")
    label = entry.get("label")
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label != int(label) \
            or not 0 < label <= MAX_LABEL:
        raise InputError(f"{what}: the label must be a whole number from 1 to {MAX_LABEL}, got {label!r}")
    box = _coordinates(entry, "box_ijk", what, count=2)
    pts = _coordinates(entry, "points_ijk", what)
    if box is None and pts is None:
        raise InputError(f"{what} needs a box_ijk or points_ijk")
    labels = entry.get("point_labels", [1] * (0 if pts is None else len(pts)))
    if pts is not None and (not isinstance(labels, list) or len(labels) != len(pts)
                            or any(v not in (0, 1) or isinstance(v, bool) for v in labels)):
        raise InputError(f"{what}: point_labels must give 1 (inside) or 0 (outside) for each of its {len(pts)} points")
    allp = np.concatenate([a for a in (box, pts) if a is not None])
    if (allp < 0).any() or (allp[:, ::-1] > np.asarray(shape_kji) - 1).any():
        raise InputError(f"{what} lies outside the volume")
    frame, xy = _to_slice(allp, axis, what)
    nbox = 0 if box is None else 2
    return Prompt(frame=frame, obj_id=int(label),
                  box=None if box is None else tuple(np.concatenate([xy[:2].min(0), xy[:2].max(0)]).tolist()),
                  points=None if pts is None else xy[nbox:],
                  point_labels=None if pts is None else np.asarray(labels, dtype=np.int32))


def _coordinates(entry: dict, key: str, what: str, count: int | None = None) -> np.ndarray | None:
    """(P, 3) finite voxel coordinates under ``key`` (exactly ``count`` of them when given), or None."""
    if key not in entry:
        return None
    try:
        points = np.asarray(entry[key], dtype=float)
    except (TypeError, ValueError):
        points = np.empty((0, 0))
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0 or (count and len(points) != count):
        size = f"{count} " if count else ""
        raise InputError(f"{what}: {key} must be a list of {size}[i, j, k] voxel coordinates")
    if not np.all(np.isfinite(points)):
        raise InputError(f"{what}: {key} holds a coordinate that is not a finite number")
    return points
