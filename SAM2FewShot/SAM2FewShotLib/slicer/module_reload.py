"""Which imported modules Developer Reload must drop so that it picks up edits beyond the module file.

Slicer's Reload (ScriptedLoadableModuleWidget.onReload) re-executes only SAM2FewShot.py; its
``import SAM2FewShotPanel...`` and ``import SAM2FewShotLib...`` lines find the old modules in
sys.modules and keep the old code. Slicer's WebServer and MONAIAuto3DSeg reload their helper
packages in their own onReload (with ``imp``, gone in Python 3.12); here the packages' entries are
removed from sys.modules instead, so the re-executed module file imports them afresh. No Qt here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, MutableMapping

PACKAGES = ("SAM2FewShotEffect", "SAM2FewShotPanel", "SAM2FewShotLib")  # dependents first: they import the engine


def in_package(name: str, package: str) -> bool:
    """``name`` is ``package`` or one of its submodules (not a sibling sharing the prefix)."""
    return name == package or name.startswith(package + ".")


def modules_to_drop(loaded: Iterable[str], packages: Iterable[str] = PACKAGES) -> list[str]:
    """The loaded module names inside ``packages``, in dependency order: the packages in the order given
    (dependents first), and within each the deepest submodules first, the package itself last."""
    names = list(loaded)
    order = []
    for package in packages:
        inside = [n for n in names if in_package(n, package)]
        order += sorted(inside, key=lambda n: (-n.count("."), n))
    return order


def drop_modules(modules: MutableMapping[str, object] | None = None,
                 packages: Iterable[str] = PACKAGES) -> list[str]:
    """Remove the packages' entries from ``modules`` (sys.modules by default); the names removed."""
    modules = sys.modules if modules is None else modules
    dropped = modules_to_drop(list(modules), packages)
    for name in dropped:
        modules.pop(name, None)
    return dropped
