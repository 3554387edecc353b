"""The package's import graph: one way, no cycles, no private names across modules (docs/architecture.md).

Every ``import`` and ``from ... import`` of every module counts, at the top level, inside functions and under
``TYPE_CHECKING`` alike: a cycle that only a lazy import keeps from failing is still a cycle.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "prunecli"

# Bottom to top: a module may import modules of its own layer or below, never above. Within a layer the
# graph must still be acyclic. A new module must be placed here (and in docs/architecture.md).
LAYERS = (
    ("prunecli._version", "prunecli.errors", "prunecli.humanize", "prunecli.budget", "prunecli.config",
     "prunecli.config.*", "prunecli.results", "prunecli.runtime", "prunecli.outputs"),
    ("prunecli.samples", "prunecli.io", "prunecli.io.*", "prunecli.io.formats", "prunecli.io.formats.*",
     "prunecli.layers", "prunecli.graph", "prunecli.graph.*", "prunecli.allocate",
     "prunecli.measure", "prunecli.latency_model", "prunecli.reconstruct", "prunecli.reconstruct.*",
     "prunecli.sensitivity",
     "prunecli.criteria", "prunecli.criteria.*",
     "prunecli.tasks", "prunecli.yolo"),
    ("prunecli.planning", "prunecli.pipeline", "prunecli.pipeline.*", "prunecli.provenance", "prunecli.training",
     "prunecli.training.*", "prunecli.methods", "prunecli.methods.*", "prunecli.export", "prunecli.export.*",
     "prunecli.latency", "prunecli.report", "prunecli.report.*"),
    ("prunecli.api",),
    ("prunecli.cli", "prunecli.cli.*"),
    ("prunecli", "prunecli.__main__"),
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in ``module`` that targets the package."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "prunecli"]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            if target.split(".")[0] != "prunecli":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, None, node.lineno) if submodule in MODULES else (target, alias.name, node.lineno))
    return found


def _layer(module: str) -> int:
    for index, patterns in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return index
    raise AssertionError(f"{module} is in no layer: place it in tests/test_imports.py LAYERS and docs/architecture.md")


def _edges() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in _imports(m) if target in MODULES and target != m} for m in MODULES}


def test_the_package_has_modules_to_check():
    assert {"prunecli.api", "prunecli.graph", "prunecli.io.slim", "prunecli.criteria.base"} <= set(MODULES)


def test_the_format_adapters_are_io_modules_of_layer_1():
    formats = {m for m in MODULES if m.startswith("prunecli.io.formats")}
    assert formats == {"prunecli.io.formats", *(f"prunecli.io.formats.{m}" for m in
                                                ("base", "hf", "slim", "state_dict", "ultralytics", "whole_model"))}
    assert {_layer(m) for m in formats} == {1}


def test_no_module_imports_a_private_name_of_another():
    offences = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, name, line in _imports(module)
        if name is not None and name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert not offences, "\n".join(offences)


def test_the_import_graph_has_no_cycle():
    edges, state, stack = _edges(), {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target):], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module)


def test_imports_go_one_way_down_the_layers():
    offences = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _edges().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not offences, "\n".join(sorted(offences))


def test_only_the_graph_package_imports_torch_pruning():
    importers = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(name.split(".")[0] == "torch_pruning" for name in names):
                importers.add(module)
    assert importers and all(m.startswith("prunecli.graph.") for m in importers), sorted(importers)


def test_nothing_below_the_package_entry_imports_from_it():
    offences = [f"{m}:{line} imports {name} from prunecli" for m in MODULES if m != "prunecli"
                for target, name, line in _imports(m) if target == "prunecli"]
    assert not offences, "\n".join(offences)


def test_the_checker_sees_lazy_imports_and_relative_ones(tmp_path, monkeypatch):
    source = "def f():\n    from prunecli.api import _secret\n"
    monkeypatch.setitem(MODULES, "prunecli.fake", tmp_path / "fake.py")
    (tmp_path / "fake.py").write_text(source)
    assert _imports("prunecli.fake") == [("prunecli.api", "_secret", 2)]
    (tmp_path / "fake.py").write_text("from .graph import DependencyGraph\nfrom . import graph\n")
    assert _imports("prunecli.fake") == [("prunecli.graph", "DependencyGraph", 1), ("prunecli.graph", None, 2)]
