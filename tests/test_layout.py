"""The package's layers: imports run one way, and no module imports another in a circle.

    cli, integrations  ->  tiled, __init__  ->  perf  ->  engine  ->  io  ->  errors

Imports are read with ``ast`` (module level and inside functions alike), so an import hidden in a
function to dodge a cycle at import time still counts. A layer may import its own modules and any
layer below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bigpicture

PACKAGE = Path(bigpicture.__file__).parent
# layer of each first-level name under the package; higher layers may import lower ones
LAYERS = {"errors": 0, "io": 1, "engine": 2, "perf": 3, "tiled": 4, "": 4, "onnx": 4, "cli": 5, "__main__": 5}
# onnx: bp.from_onnx is public; it converts with onnx2torch and imports nothing of the package but errors
TOP = 5  # integrations (monai, onnx, ...) sit with the command line: they use the public face
MAX_LINES = 400


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``root``."""
    out = {}
    for path in root.rglob("*.py"):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (an imported name that is a module counts as one)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # `import pkg.mod.attr` style: the longest module prefix
                    t = t.rpartition(".")[0]
                if not t or t == mod:
                    continue
                # a package re-exporting its own children, and a child importing its package's names
                if t.startswith(mod + ".") and path.name == "__init__.py":
                    continue
                if mod.startswith(t + ".") and mods[t].name == "__init__.py":
                    continue
                graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str, layers: dict[str, int]) -> int:
    first = module.split(".")[1] if "." in module else ""
    return layers.get(first, TOP)


def against_order(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Imports from a lower layer to a higher one, as ``a -> b``."""
    return sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b, layers) > layer(a, layers)
    )


def test_the_package_has_no_import_cycle():
    assert cycles(imports(PACKAGE)) == []


def test_imports_run_one_way():
    assert against_order(imports(PACKAGE), LAYERS) == []


def test_the_engine_never_imports_the_performance_model_or_the_public_face():
    graph = imports(PACKAGE)
    engine = {b for a, targets in graph.items() if a.startswith("bigpicture.engine") for b in targets}
    assert not [b for b in engine if b.startswith(("bigpicture.perf", "bigpicture.tiled", "bigpicture.cli"))]
    assert "bigpicture" not in engine  # the package's __init__ is the public face


def test_no_module_is_over_the_line_budget_and_few_sit_at_the_top():
    long = {m: n for m, p in modules(PACKAGE).items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
    top = [m for m, p in modules(PACKAGE).items() if m.count(".") == 1 and p.name != "__init__.py"]
    assert len(top) <= 6, top


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("inside_function", [False, True])
def test_a_cycle_put_in_on_purpose_is_found(tmp_path, inside_function):
    back = "def f():\n    from pkg.engine.a import x\n" if inside_function else "from pkg.engine.a import x\n"
    pkg = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "engine/__init__.py": "",
            "engine/a.py": "from . import b\nx = 1\n",
            "engine/b.py": "from .c import y\n",
            "engine/c.py": back + "y = 2\n",
        },
    )
    assert cycles(imports(pkg)) == [["pkg.engine.a", "pkg.engine.b", "pkg.engine.c"]]


def test_an_import_against_the_order_is_found(tmp_path):
    pkg = write_package(
        tmp_path,
        {
            "__init__.py": "from pkg.tiled import tiled\n",
            "tiled.py": "from pkg.perf.predict import predict\ntiled = 1\n",
            "engine/__init__.py": "",
            "engine/plan.py": "def prediction():\n    import pkg.perf.predict\n",
            "perf/__init__.py": "",
            "perf/predict.py": "from pkg.engine.plan import prediction\npredict = 1\n",
        },
    )
    graph = imports(pkg)
    assert cycles(graph) == [["pkg.engine.plan", "pkg.perf.predict"]]
    assert against_order(graph, LAYERS) == ["pkg.engine.plan -> pkg.perf.predict"]
    # without the upward import the same package is clean
    (pkg / "engine/plan.py").write_text("def prediction():\n    pass\n")
    assert cycles(imports(pkg)) == [] and against_order(imports(pkg), LAYERS) == []
