"""The package's layers: importing it is quiet and light, and its modules import each other without cycles."""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

import atst_features

SRC = Path(atst_features.__file__).parent
# Heavy or optional modules that a plain `import atst_features` must not pull in.
NOT_AT_IMPORT = (
    "atst_features.train",
    "atst_features.batch",
    "ray",
    "gdown",
    "matplotlib",
    "tensorboard",
    "sklearn",
)


def test_import_is_quiet_and_light(tmp_path):
    report = tmp_path / "loaded.json"
    probe = (
        "import atst_features\n"
        "import json, sys\n"
        f"names = {list(NOT_AT_IMPORT)!r}\n"
        "json.dump([n for n in names if n in sys.modules], open(sys.argv[1], 'w'))\n"
    )
    command = [sys.executable, "-c", probe, str(report)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == "", f"`import atst_features` printed:\n{run.stdout}{run.stderr}"
    loaded = json.loads(report.read_text())
    assert not loaded, f"`import atst_features` imported {', '.join(loaded)}"


# ---------------------------------------------------------------------------- the module graph


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside functions, except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that one import statement in ``module`` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            base_parts = here[: len(here) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in modules:  # `import pkg.x.y` of a function y names pkg.x
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def _graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package modules it imports, for the package in folder ``root``."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _imports(tree):
            edges |= _targets(node, module, path.name == "__init__.py", modules)
        graph[module] = edges - {module}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "from .a import f\n",
        "a.py": "import os\nfrom . import b\n\ndef f():\n    from .sub import c\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nelse:\n    import pkg.sub\n",
        "sub/__init__.py": "from . import c\n",
        "sub/c.py": "from .. import __version__\nfrom ..b import thing\nimport pkg.a as alias\n",
    }
    for name, text in sources.items():
        (pkg / name).write_text(text)
    assert _graph(pkg) == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b", "pkg.sub.c"},  # module level, and inside a function
        "pkg.b": {"pkg.sub"},  # not what is under `if TYPE_CHECKING:`, but its `else:`
        "pkg.sub": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg", "pkg.b", "pkg.a"},
    }
    graph = _graph(pkg)
    cycle = _find_cycle(graph)
    assert cycle[0] == cycle[-1] and all(b in graph[a] for a, b in itertools.pairwise(cycle))
    (pkg / "sub" / "c.py").write_text("import os\n")
    (pkg / "__init__.py").write_text("")
    assert _find_cycle(_graph(pkg)) is None


def test_modules_import_each_other_without_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
