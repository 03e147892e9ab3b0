"""The one request every front end builds: the CLI from its arguments, the worker from its JSON
protocol, the bench and batch runs directly. The Runner takes it and nothing else.

Paths are strings (they travel as JSON); method parameters are a mapping of JSON values (or the
method's own Params), typed and checked by the method's registry entry. Imports nothing heavy:
the Slicer panel builds requests before torch is installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from ..sam2.build import ModelOptions

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class FrameOptions:
    """How the query becomes frames: the slicing axis, the model-input normalisation, a slice range."""

    axis: str = "auto"  # auto (the acquisition axis), axial, coronal, sagittal
    normalization: str = "auto"  # auto, a CT preset, window:C,W or percentile:LO,HI
    per_slice_normalization: bool = False
    slice_range: tuple[int, int] | None = None  # first, last (inclusive) along the axis
    frame: int | None = None  # a 4D query: the frame to segment (required when it has several)
    component: int | None = None  # a vector or colour query: the component to segment
    series: str | None = None  # a DICOM folder query: the series UID to read (default: the one with most files)


@dataclass(frozen=True)
class Request:
    """What to segment, with which method and model, conditioned by what, and where the result goes.

    One of the conditioning inputs, as the method asks: ``prompt_labels`` and/or ``prompts`` for
    propagate, ``supports`` for matched support, registration and guided, ``library`` for retrieval.
    ``out`` and ``report`` are optional for callers that keep the result in memory (the bench).
    """

    method: str
    query: str
    out: str | None = None
    report: str | None = None
    prompt_labels: str | None = None  # a label file on the query's grid: masks on some slices
    values: tuple[int, ...] | None = None  # the label values of prompt_labels to use (default all)
    prompts: str | None = None  # a JSON file of boxes and points in voxel coordinates
    supports: tuple[tuple[str, str], ...] = ()  # (image, labels) files of labelled cases
    library: str | None = None  # a folder (or list file) of labelled cases
    model: ModelOptions = field(default_factory=ModelOptions)
    frames: FrameOptions = field(default_factory=FrameOptions)
    params: Mapping[str, Any] = field(default_factory=dict)
    preset: str | None = None  # the published construction the parameters come from (methods/presets.py)

    def __post_init__(self) -> None:
        """Paths as plain strings, whatever the caller gave (Path, str)."""
        for name in ("query", "out", "report", "prompt_labels", "prompts", "library"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        object.__setattr__(self, "supports", tuple((os.fspath(i), os.fspath(lab)) for i, lab in self.supports))
        if self.values is not None:
            object.__setattr__(self, "values", tuple(self.values))
