"""The layers import downward only (docs/ARCHITECTURE.md): a static check over every import statement of our
packages, lazy imports inside functions included, and no cycle between modules.

    ldm/                                  anything of ours: nothing
    quant/  correction/  evaluation/      ldm/ only (siblings do not import each other)
    pipeline/                             ldm/, quant/, correction/, evaluation/, pipeline/
    quant_scripts/, evaluator.py, main.py, benchmarks/   anything
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

OURS = ("ldm", "quant", "correction", "evaluation", "pipeline", "quant_scripts", "benchmarks", "evaluator", "main")
ALLOWED = {
    "ldm": {"ldm"},
    "quant": {"ldm", "quant"},
    "correction": {"ldm", "correction"},
    "evaluation": {"ldm", "evaluation"},
    "pipeline": {"ldm", "quant", "correction", "evaluation", "pipeline"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in OURS}
    return found


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in ALLOWED for p in (REPO / pkg).rglob("*.py")}


def test_every_package_imports_only_downward():
    bad = []
    for name, path in sorted(sources().items()):
        allowed = ALLOWED[name.split(".")[0]]
        bad += [f"{name} imports {imp}" for imp in sorted(imports(path)) if imp.split(".")[0] not in allowed]
    assert not bad, "forbidden import directions:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    mods = sources()
    graph = {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}
    # a package's __init__ that only re-exports its own submodules is not a cycle of meaning: drop edges from a
    # module to the package containing it (Python resolves those from the partially initialised package)
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The check can fail: a correction module importing quant (lazily, inside a function) is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from quant.model import QuantModel\n    import pipeline.layout\n")
    assert imports(bad) == {"quant.model", "quant.model.QuantModel", "pipeline.layout"}


@pytest.mark.parametrize("package, forbidden", [
    ("ldm.models.diffusion.ddim", ("correction", "quant", "evaluation", "pipeline")),
    ("quant.api", ("correction", "evaluation", "pipeline", "quant_scripts")),
    ("correction.samplers", ("quant", "evaluation", "pipeline", "quant_scripts")),
    ("evaluation.generation", ("quant", "correction", "pipeline", "quant_scripts")),
])
def test_each_package_imports_alone(package, forbidden):
    """Importing a package alone loads none of the layers above it (checked in a fresh interpreter)."""
    code = (f"import sys, {package}; bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}); "
            f"assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
