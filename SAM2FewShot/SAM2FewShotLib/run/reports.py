"""Reading a run's JSON report back: which axis it sliced along, and where SAM2 was unsure.

The report is written by methods/common.build_report; the Slicer panel (its table of slices to
check) and cohort runs (a count per case) read it through here. Imports nothing heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..common.errors import InputError

AXIS_INDEX = {"k": 0, "j": 1, "i": 2}  # report axis name -> numpy axis of a (k, j, i) array


@dataclass(frozen=True)
class SliceFlag:
    slice: int
    segment: str
    score: float  # SAM2's object-score logit: > 0 means "the structure is on this slice"
    voxels: int
    source: str

    @property
    def confidence(self) -> float:
        """The object score as a probability that the structure is present."""
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, self.score))))


def report_axis(report: dict) -> int:
    """The numpy axis (of the query's (k, j, i) array) the run sliced along."""
    name = report.get("session", {}).get("axis")
    if name not in AXIS_INDEX:
        raise InputError(f"the report names no slicing axis (got {name!r})")
    return AXIS_INDEX[name]


def result_axis(report: dict, volume) -> int:
    """The axis a result's slices run along: the run's (its report's session); for a run without slices
    (registration), the axis a run would slice ``volume`` along by default, the acquisition axis."""
    from ..io.slicing import slicing_axis

    return report_axis(report) if "session" in report else slicing_axis(volume, "auto")


def low_confidence_slices(report: dict, margin: float = 2.0, limit: int = 500) -> list[SliceFlag]:
    """Slices where SAM2 was unsure a structure is there: |object score| below ``margin``.

    Prompted slices (the user's or the support's own masks) and slices the run never visited are
    left out. Most doubtful first; at most ``limit`` rows.
    """
    flags = []
    for entry in report.get("slices", []):
        for name, obj in entry.get("objects", {}).items():
            score, source = obj.get("object_score"), str(obj.get("source", ""))
            if score is None or source.endswith("prompt") or source == "not visited":
                continue
            if abs(float(score)) < margin:
                flags.append(SliceFlag(int(entry["slice"]), name, float(score), int(obj.get("voxels", 0)), source))
    flags.sort(key=lambda f: (abs(f.score), f.slice, f.segment))
    return flags[:limit]
