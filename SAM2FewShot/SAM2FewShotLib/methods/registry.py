"""The methods a request can name, and what each needs: one line per method in ``METHODS``.

A method named ``my-method`` lives in ``methods/my_method.py`` with a parameter dataclass ``Params``
(every default, and a ``check()`` that raises InputError), the ``OPTIONS`` the front ends offer for it
(methods/options.py) and ``run(inputs: MethodInputs, params) -> (LabelMap, report)``. The registry and
the method modules import nothing heavy at load (their work imports torch, sam2 or SimpleITK when it
runs): the CLI's help and the Slicer panel read the methods and their options before torch is installed.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..common.errors import InputError

# What conditions a method: the user's prompts on the query, labelled support cases, or a library.
PROMPTS, SUPPORTS, LIBRARY = "prompts", "supports", "library"


@dataclass(frozen=True)
class MethodSpec:
    key: str  # the name in requests, the CLI's --method and the worker protocol
    label: str  # the name the Slicer panel shows
    inputs: str  # PROMPTS, SUPPORTS or LIBRARY
    needs_model: bool  # False: runs without SAM2 or its weights
    summary: str
    slice_range: bool = True  # False: always segments the whole volume

    @property
    def uses_support_volume(self) -> bool:
        """True when the method is conditioned by labelled cases, not by the query's own prompts."""
        return self.inputs != PROMPTS

    @property
    def module_name(self) -> str:
        return f"{__package__}.{self.key.replace('-', '_')}"

    def load(self) -> ModuleType:
        """The method's module (its Params, OPTIONS and run)."""
        return importlib.import_module(self.module_name)

    def options(self) -> tuple:
        """The options the front ends offer for this method (methods/options.MethodOption), if any."""
        return tuple(getattr(self.load(), "OPTIONS", ()))  # a method may have none of its own

    def defaults(self):
        """The method's Params with every default: the one place they are written."""
        return self.load().Params()

    def params(self, values: Any = None, seed: int | None = None):
        """The method's Params from a mapping of JSON values (or a Params as is), checked.

        Unknown keys and wrong value types are refused in one line; a ``seed`` field left unset takes
        ``seed`` (the request's model seed), nested parameter groups included.
        """
        cls = self.load().Params
        if isinstance(values, cls):
            params = values
        elif values is None or isinstance(values, Mapping):
            params = dataclass_from_json(cls(), dict(values or {}), seed)
        else:
            raise InputError(f"the parameters of {self.key} must be a mapping, got {type(values).__name__}")
        params.check()
        return params


METHODS: dict[str, MethodSpec] = {m.key: m for m in (
    MethodSpec("propagate", "Propagate", PROMPTS, True,
               "Masks drawn on a few slices of the query are propagated through the volume."),
    MethodSpec("matched-support", "Matched support", SUPPORTS, True,
               "Labelled slices of support cases, matched per query slice, condition SAM2."),
    MethodSpec("retrieval", "Retrieval", LIBRARY, True,
               "The most similar labelled slices of a support library condition SAM2."),
    MethodSpec("registration", "Registration", SUPPORTS, False,
               "Support cases registered to the query and fused: CPU only, no model weights.", slice_range=False),
    MethodSpec("guided", "Guided", SUPPORTS, True,
               "A registration or memory pseudo-mask per slice becomes the prompt SAM2 refines."),
)}


def get_method(key: str) -> MethodSpec:
    try:
        return METHODS[key]
    except KeyError:
        raise InputError(f"unknown method '{key}': use one of {', '.join(METHODS)}") from None


def dataclass_from_json(base, values: dict, seed: int | None = None, where: str = ""):
    """``base`` (a dataclass instance) with ``values`` replaced, unknown keys and wrong types refused.

    A field whose value is a dataclass takes a nested mapping (applied to that value, so a group's
    own defaults stay). A ``seed`` field left unset takes ``seed``. Fields the class lists in
    ``FROM_REQUEST`` are set by the runner from the request, never from parameters.
    """
    cls = type(base)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in getattr(cls, "FROM_REQUEST", ())]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise InputError(f"unknown parameter(s) {', '.join(where + u for u in unknown)}: known are "
                         f"{', '.join(where + n for n in names)}")
    changes = {}
    for name in names:
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            nested = values.get(name, {})
            if not isinstance(nested, Mapping):
                raise InputError(f"parameter {where}{name} must be a mapping of parameters, got {nested!r}")
            changes[name] = dataclass_from_json(current, dict(nested), seed, f"{where}{name}.")
        elif name in values:
            changes[name] = _checked_value(f"{where}{name}", values[name], current)
        elif name == "seed" and seed is not None:
            changes[name] = int(seed)
    return dataclasses.replace(base, **changes)


def _checked_value(name: str, value: Any, default: Any) -> Any:
    """``value`` if it has the default's JSON type (an int may stand for a float; None for an unset number)."""
    if default is None:
        if value is None:
            return None
        want = float  # optional parameters are numbers that default to "unset"
    else:
        want = type(default)
    if isinstance(value, bool) != (want is bool):
        raise InputError(f"parameter {name} must be a {want.__name__}, got {value!r}")
    if isinstance(value, want) or (want is float and isinstance(value, int)):
        return float(value) if want is float else value
    raise InputError(f"parameter {name} must be a {want.__name__}, got {value!r}")
