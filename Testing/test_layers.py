"""The engine's architecture as a test: every import follows the layers, no module imports itself in a
circle, and no module outgrows ~500 lines.

Imports are read from the source (ast), function-level and TYPE_CHECKING ones included: a lazy
import that goes upwards or closes a cycle is still a tangle, only a hidden one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import SAM2FewShotLib

ENGINE = Path(SAM2FewShotLib.__file__).resolve().parent
PACKAGE = "SAM2FewShotLib"
RANK = {package: rank for rank, packages in enumerate(SAM2FewShotLib.LAYERS) for package in packages}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Engine modules that ``name`` imports (a package's own name when only the package is imported)."""
    path = MODULES[name]
    own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")[: len(own_package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
            found |= submodules or {target}
    return found & set(MODULES) | {m for m in found if m == PACKAGE}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_subpackage_has_a_layer_and_says_what_it_holds():
    packages = {p.parent.name for p in ENGINE.glob("*/__init__.py")}
    assert packages == set(RANK), f"packages without a layer: {packages - set(RANK)}; layers without a package: " \
                                  f"{set(RANK) - packages}"
    assert not [p.name for p in ENGINE.glob("*.py") if p.name != "__init__.py"], "modules belong in a layer"
    for package in packages:
        doc = ast.get_docstring(ast.parse((ENGINE / package / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 25 and "import" in doc.lower(), \
            f"{package}/__init__.py: say what it holds " \
            "and what it may import"


def test_imports_go_only_to_the_same_package_or_a_lower_layer():
    wrong = []
    for name, targets in GRAPH.items():
        own = layer_of(name)
        for target in targets:
            other = layer_of(target)
            if own is None or other is None or other == own:
                continue  # the package root (version, layer table) is below everything
            if not RANK[other] < RANK[own]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports upwards or across sibling layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph: every component is one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH.get(node, ()):
            if target == node:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_see_real_imports():
    """A positive control: the graph is read correctly, or the tests above would pass vacuously."""
    assert "SAM2FewShotLib.common.errors" in GRAPH["SAM2FewShotLib.io.volume"]
    assert "SAM2FewShotLib.sam2.session" in GRAPH["SAM2FewShotLib.methods.propagate"]
    assert "SAM2FewShotLib.run.protocol" in GRAPH["SAM2FewShotLib.run.worker"]
    assert sum(map(len, GRAPH.values())) > 150


def test_no_module_outgrows_the_limit():
    long = {name: n for name, p in MODULES.items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"
