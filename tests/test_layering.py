"""The package layering ops -> quant -> layers -> sglang / models / tools, enforced on every import.

Every module of sgl_ascend is parsed with `ast` (so imports inside functions count as much as those at the
top, and nothing is imported to find out), and:
- no module imports from a later layer (quant importing layers, layers importing sglang, ...);
- the packages' import graph has no cycle (models -> sglang -> models would fail even within one layer);
- every package has a layer here, so a new package has to say where it sits.
"""

import ast
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "sgl_ascend"

# package (or top-level module) of sgl_ascend -> layer; an import may only go to the same or an earlier layer.
LAYERS: Dict[str, int] = {
    "errors": 0, "ops": 0,
    "quant": 1,
    "layers": 2,
    "models": 3, "sglang": 3, "tools": 3, "testing": 3, "sglang_plugin": 3, "__init__": 3,
}
_DYNAMIC_IMPORTS = ("import_module", "__import__")


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> Tuple[str, bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(source: str, module: str, is_package: bool) -> Iterator[Tuple[str, int]]:
    """(absolute module, line) for every import in `source`, at any depth, relative ones resolved;
    `from sgl_ascend import x` yields sgl_ascend.x, and importlib.import_module("sgl_ascend.x") counts."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "sgl_ascend":
                for alias in node.names:
                    yield f"sgl_ascend.{alias.name}", node.lineno
            else:
                yield target, node.lineno
        elif isinstance(node, ast.Call):
            func = node.func
            name = getattr(func, "attr", None) or getattr(func, "id", None)
            if name in _DYNAMIC_IMPORTS and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                yield node.args[0].value, node.lineno


def package_imports(root: pathlib.Path = ROOT) -> List[Tuple[str, str, str, int]]:
    """(from package, to package, file, line) for every import of one sgl_ascend package by another."""
    edges = []
    for path in sorted(root.rglob("*.py")):
        module, is_package = _module_name(path, root)
        source_package = _package(module)
        for target, line in imported_modules(path.read_text(), module, is_package):
            if target == "sgl_ascend" or not target.startswith("sgl_ascend."):
                continue
            target_package = _package(target)
            if target_package != source_package:
                edges.append((source_package, target_package, str(path.relative_to(root.parent)), line))
    return edges


def layering_violations(edges) -> List[str]:
    return [f"{file}:{line}: {src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})"
            for src, dst, file, line in edges if LAYERS.get(dst, 99) > LAYERS.get(src, -1)]


def package_cycles(edges) -> List[List[str]]:
    graph: Dict[str, Set[str]] = {}
    for src, dst, _, _ in edges:
        graph.setdefault(src, set()).add(dst)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_every_package_has_a_layer():
    packages = {_package(_module_name(p)[0]) for p in ROOT.rglob("*.py")}
    assert not packages - set(LAYERS), f"give these packages a layer in {__file__}: {packages - set(LAYERS)}"


def test_no_import_from_a_later_layer():
    assert layering_violations(package_imports()) == []


def test_no_import_cycle_between_packages():
    assert package_cycles(package_imports()) == []


# -- the checker itself catches what it should (break-proof) -------------------------------------------

@pytest.mark.parametrize("source", [
    "def scheme():\n    from sgl_ascend.layers.schemes import UnquantizedLinear\n",
    "from ..layers import registry\n",
    "from sgl_ascend import layers\n",
    "import sgl_ascend.sglang.ct_config\n",
    "import importlib\nimportlib.import_module('sgl_ascend.layers.registry')\n",
])
def test_checker_finds_an_upward_import(tmp_path, source):
    root = tmp_path / "sgl_ascend"
    (root / "quant").mkdir(parents=True)
    (root / "quant" / "__init__.py").write_text("")
    (root / "quant" / "bad.py").write_text(source)
    violations = layering_violations(package_imports(root))
    assert len(violations) == 1 and violations[0].startswith("sgl_ascend/quant/bad.py:") and "quant (layer 1)" in violations[0]


def test_checker_finds_a_cycle():
    edges = [("models", "sglang", "a.py", 1), ("sglang", "models", "b.py", 1), ("sglang", "layers", "b.py", 2)]
    assert package_cycles(edges) == [["models", "sglang", "models"]]
