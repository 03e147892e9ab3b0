"""Method parameters as the front ends offer them, each declared once.

A method's ``Params`` dataclass holds every default; an ``Option`` says how a front end shows one
parameter (flag, help, choices) and the method's ``OPTIONS`` say which parameter each of its options sets
(``TOP_K.at("fewshot.top_k")`` for a nested group). The CLI builds its option groups from these, the
Slicer panel its choices and defaults, the bench its support options: none writes a default of its own.
Options several methods share, and ``MemoryParams``, the parameters of the methods conditioned by
support memories (matched support, retrieval), live here. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..common.choices import EXTENTS, FUSION_METHODS, PASS_ORDERS, PLACEMENTS, SCHEMES, SIMILARITY_FEATURES, TRANSFORMS
from ..common.errors import InputError


@dataclass(frozen=True)
class Option:
    """How one parameter is offered: ``--flag``, its help and its choices (its default and type come from
    the Params field it sets)."""

    flag: str
    help: str
    choices: tuple = ()
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def at(self, path: str = "") -> MethodOption:
        """This option setting the Params field ``path`` (default: the field named like the option)."""
        return MethodOption(self, path or self.dest)


@dataclass(frozen=True)
class MethodOption:
    option: Option
    path: str  # the Params field it sets; "group.field" in a nested group

    def default(self, params) -> Any:
        """The field's default in ``params`` (the method's Params())."""
        value = params
        for name in self.path.split("."):
            value = getattr(value, name)
        return value


def set_path(values: dict, path: str, value: Any) -> None:
    """values["a"]["b"] = value for path "a.b" (a nested group of parameters)."""
    *groups, last = path.split(".")
    target = values
    for group in groups:
        target = target.setdefault(group, {})
        if not isinstance(target, dict):
            raise InputError(f"{group} is not a group of parameters")
    target[last] = value


def params_from(options: Iterable[MethodOption], given: Mapping[str, Any]) -> dict:
    """The parameter mapping of the options given (by dest; None: not given, the Params default stays)."""
    values: dict = {}
    for method_option in options:
        value = given.get(method_option.option.dest)
        if value is not None:
            set_path(values, method_option.path, value)
    return values


# --- options several methods share ------------------------------------------------------------------------

SCHEME = Option("--scheme", "how matched supports condition SAM2 (README: Which conditioning scheme)", SCHEMES)
AUGMENTATIONS = Option("--augmentations", "augmented copies per support slice (the original is one of them)")
SLICES_PER_STRUCTURE = Option("--slices-per-structure", "support slices per structure")
SIMILARITY = Option("--features", "how support and query slices are compared: SAM2's encoder features or intensity",
                    SIMILARITY_FEATURES)
POSITION_WEIGHT = Option("--position-weight", "penalty on the difference in relative slice position when matching")
TOP_K = Option("--top-k", "support (or library) memories per query slice")
EXTENT = Option("--extent", "where each structure starts and ends: its longest run of slices SAM2 accepts, or "
                            "every slice its object score accepts", EXTENTS)
TRANSFORM = Option("--transform", "registration: affine, or affine then B-spline", TRANSFORMS)
FUSION = Option("--fusion", "registration: how the warped labels of several supports are fused", FUSION_METHODS)

# What the matched supports of matched support (and of guided's sam2 prior) take from the options.
SUPPORT_OPTIONS = (AUGMENTATIONS, SLICES_PER_STRUCTURE, SIMILARITY, TOP_K, EXTENT, POSITION_WEIGHT)


@dataclass(frozen=True)
class MemoryParams:
    """What the methods conditioned by support memories share: how many memories a slice gets and from
    where (its own matches and its neighbours'), where they sit in the video and how the passes sweep it,
    and which slices keep a structure."""

    top_k: int = 3  # support memories per query slice
    neighbours: int = 1  # a slice is also conditioned by its neighbours' matches (up to top_k memories)
    extent: str = "largest-run"  # or "score": keep every slice SAM2's object score accepts
    min_object_score: float = 0.0  # a structure is erased from slices where SAM2's object score is not above this
    placement: str = "behind"  # where the memories sit in the video: behind | before-query | after-query
    passes: str = "both"  # both | forward | middle-out (sam2/conditioning.MemoryPolicy)

    def check(self) -> None:
        if self.top_k < 1:
            raise InputError(f"top-k must be at least 1, got {self.top_k}")
        if self.neighbours < 0:
            raise InputError(f"neighbours must be 0 or more, got {self.neighbours}")
        for name, value, allowed in (("extent rule", self.extent, EXTENTS), ("placement", self.placement, PLACEMENTS),
                                     ("pass order", self.passes, PASS_ORDERS)):
            if value not in allowed:
                raise InputError(f"unknown {name} '{value}': use one of {', '.join(allowed)}")


MEMORY_OPTIONS = (TOP_K.at(), EXTENT.at())


def defaults_of(params_class) -> dict:
    """Field name -> default of a Params dataclass (the one place a default is written)."""
    instance = params_class()
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(params_class)}
