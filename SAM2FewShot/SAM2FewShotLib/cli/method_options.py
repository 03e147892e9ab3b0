"""The methods' options as command-line arguments, built from what each method declares (methods/options.py).

An option is offered once, in the group of the first method (in registry order) that declares it, and
its help names every method that takes it; its default, shown in the help, is the method's Params
default. Options left out stay unset (None), so a request carries only what the user gave and every
default comes from the method itself. Imports nothing heavy: the method modules load without torch.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..common.errors import InputError
from ..methods.options import MethodOption, params_from
from ..methods.registry import METHODS, get_method


def declarations() -> dict[str, list[tuple[str, MethodOption]]]:
    """dest -> [(method, its MethodOption)] for every method option, in registry order."""
    found: dict[str, list[tuple[str, MethodOption]]] = {}
    for key, spec in METHODS.items():
        for method_option in spec.options():
            found.setdefault(method_option.option.dest, []).append((key, method_option))
    return found


def add_method_options(groups: dict[str, Any]) -> None:
    """Every method's options, each in the group of the first method that declares it (``groups``: method ->
    its argument group)."""
    for dest, users in declarations().items():
        first_method, first = users[0]
        option = first.option
        default = first.default(get_method(first_method).defaults())
        kwargs: dict[str, Any] = {"dest": dest, "default": None, "help": _help(option.help, users, default)}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = float if default is None else type(default)
            if option.choices:
                kwargs["choices"] = list(option.choices)
            else:
                kwargs["metavar"] = option.metavar or ("N" if isinstance(default, int) else "X")
        groups[first_method].add_argument(option.flag, **kwargs)


def _help(text: str, users: list[tuple[str, MethodOption]], default: Any) -> str:
    methods = [method for method, _ in users]
    shown = "" if default is None or isinstance(default, bool) else f"; default: {default}"
    return f"{text} ({', '.join(methods)}{shown})"


def given(args: argparse.Namespace) -> dict[str, Any]:
    """dest -> value of the method options the user gave."""
    return {dest: getattr(args, dest) for dest in declarations() if getattr(args, dest, None) is not None}


def refuse_foreign(method: str, args: argparse.Namespace) -> None:
    """An option of another method is refused: given with this one, it would be silently ignored."""
    users = declarations()
    for dest in given(args):
        takers = [m for m, _ in users[dest]]
        if method not in takers:
            flag = users[dest][0][1].option.flag
            raise InputError(f"{flag} does not apply to the {method} method (it is for {' and '.join(takers)}): "
                             "leave it out")


def params_for(method: str, args: argparse.Namespace, base: dict | None = None) -> dict:
    """The method's parameters from the options given, over ``base`` (a preset's parameters)."""
    params = dict(base or {})
    for key, value in params_from(get_method(method).options(), given(args)).items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            params[key] = {**params[key], **value}
        else:
            params[key] = value
    return params
