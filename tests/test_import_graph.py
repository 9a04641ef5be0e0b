"""The package's import graph: no cycles between lsms_nnunet subpackages, and the text side stays nnU-Net free.

Run `python tests/test_import_graph.py` to print the graph (every import counts, including ones inside functions:
a lazy import hides a dependency, it does not remove it).
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lsms_nnunet", "text_conditioning")
#: Cycles tolerated for now: none (inference no longer imports training since the card travels in the plans).
KNOWN_CYCLES: set[frozenset[str]] = set()


def unit(module: str) -> str:
    """The node a module belongs to: an lsms_nnunet subpackage (or top-level module), or a top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "lsms_nnunet" and len(parts) > 1 else parts[0]


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a source file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def import_graph() -> dict[str, set[str]]:
    """unit -> units (and external top-level packages) it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            source = unit(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
            graph[source].update(unit(name) for name in imported_modules(path) if unit(name) != source)
    return graph


def internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph restricted to the project's own units."""
    return {source: {target for target in targets if target.split(".")[0] in PACKAGES}
            for source, targets in graph.items()}


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Pairs of units that reach each other (every cycle contains such a pair)."""
    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for target in graph.get(stack.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return seen
    reach = {node: reachable(node) for node in graph}
    return {frozenset({a, b}) for a in graph for b in reach[a] if a != b and a in reach.get(b, ())}


def test_no_cycles_between_subpackages():
    assert cycles(internal(import_graph())) <= KNOWN_CYCLES


def test_text_conditioning_imports_neither_nnunet_nor_lsms_nnunet():
    imported = import_graph()["text_conditioning"]
    assert not imported & {"nnunetv2", "lsms_nnunet"} and not any(name.startswith("lsms_nnunet") for name in imported)


def test_network_and_planning_sit_below_training_and_inference():
    graph = internal(import_graph())
    for lower in ("lsms_nnunet.network", "lsms_nnunet.planning", "lsms_nnunet.preprocessing"):
        assert not graph.get(lower, set()) & {"lsms_nnunet.training", "lsms_nnunet.inference",
                                              "lsms_nnunet.benchmark", "lsms_nnunet.evaluation"}, lower


def test_the_trainer_does_not_import_the_memory_profiler():
    assert "lsms_nnunet.planning.memory_profile" not in set().union(
        *(imported_modules(path) for path in (ROOT / "lsms_nnunet" / "training").rglob("*.py")))


if __name__ == "__main__":
    full = import_graph()
    for node, targets in sorted(internal(full).items()):
        print(f"{node} -> {', '.join(sorted(targets)) or '(nothing of ours)'}")
    found = cycles(internal(full))
    print("cycles:", sorted(sorted(pair) for pair in found) or "none")
    sys.exit(1 if found - KNOWN_CYCLES else 0)
