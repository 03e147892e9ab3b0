"""The JSON report of a run: per slice, where each structure's mask came from, its score and time."""

from __future__ import annotations

import math

import numpy as np

from .propagation import PropagationResult
from .session import VolumeSession


def build_report(method: str, session: VolumeSession, result: PropagationResult, segments, seconds: float,
                 frames_encoded: int) -> dict:
    by_value = {s.value: s for s in segments}
    slices = []
    for t in range(len(result.labels)):
        objects = {}
        for o, obj_id in enumerate(result.obj_ids):
            score = float(result.object_scores[t, o])
            entry = {
                "value": obj_id,
                "source": result.sources[t].get(obj_id, "not visited"),
                "object_score": None if math.isnan(score) else round(score, 4),
                "voxels": int(np.count_nonzero(result.labels[t] == obj_id)),
            }
            entry.update(result.details[t].get(obj_id, {}) if result.details else {})
            objects[by_value[obj_id].name if obj_id in by_value else str(obj_id)] = entry
        slices.append({"slice": t, "time_s": round(float(result.seconds[t]), 4),
                       "visited": {"forward": bool(result.visited[t, 0]), "backward": bool(result.visited[t, 1])},
                       "objects": objects})
    return {
        "method": method,
        "session": session.describe(),
        "segments": [{"value": s.value, "name": s.name, "color": list(s.color), "terminology": s.terminology}
                     for s in segments],
        "timing": {"total_s": round(seconds, 3), "frames_encoded": frames_encoded,
                   "per_slice_s": round(seconds / max(1, len(result.labels)), 4)},
        "slices": slices,
    }
