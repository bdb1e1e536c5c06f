"""The package layout stays true: no import cycles, and imports only point down the layers (ARCHITECTURE.md).

Reads the source with ``ast`` (nothing is imported or run), so it also sees imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lily_lightning"

# Each part of the package and the layer it sits on: a module may import its own part and lower layers only,
# so two parts on one layer (vit and data; training and demo) never import each other.
LAYERS = {
    "errors": 0,  # the shared utilities sit below everything, in this order
    "seeding": 0,
    "figures": 0,
    "paths": 1,
    "console": 1,
    "files": 2,
    "adapters": 3,
    "vit": 4,
    "data": 4,
    "training": 5,
    "demo": 5,
    "studies": 6,
    "cli": 7,
    "__main__": 8,
    "__init__": 8,
}
# Third-party packages a part must not import: the method is pure torch, the ViT surgery knows no Lightning.
FORBIDDEN = {
    "adapters": ("timm", "lightning", "pytorch_lightning", "torchmetrics", "peft"),
    "vit": ("lightning", "pytorch_lightning", "torchmetrics"),
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(imported module of the package or a third-party top-level name, line) for every import in ``path``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                target = f"{source}.{alias.name}"
                found.append((target if target in modules else source, node.lineno))
    return found


def part(module: str) -> str:
    """``vit`` for ``lily_lightning.vit.merge``; ``__init__`` for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layout_problems(root: Path) -> list[str]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    graph: dict[str, set[str]] = {}
    problems = []
    for file in files:
        name = module_name(file, root)
        graph[name] = set()
        for target, line in imports(file, root, modules):
            where = f"{file.relative_to(root.parent)}:{line}"
            top = target.split(".")[0]
            if top != root.name:
                if top in FORBIDDEN.get(part(name), ()):
                    problems.append(f"{where}: {part(name)}/ imports {top}")
                continue
            if target == name:
                continue
            graph[name].add(target)
            mine, theirs = part(name), part(target)
            if mine not in LAYERS or theirs not in LAYERS:
                problems.append(f"{where}: {mine if mine not in LAYERS else theirs} has no layer in LAYERS")
            elif mine != theirs and LAYERS[theirs] >= LAYERS[mine]:
                problems.append(f"{where}: {name} imports {target} ({mine} may not import {theirs})")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected part of ``graph`` that has one (depth-first search)."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt, 2) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif state.get(nxt) == 0:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [node])
    return found


def test_package_imports_point_down_the_layers_without_cycles() -> None:
    assert layout_problems(PACKAGE) == []


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"vit/merge.py": "from ..training import module\n"}, "vit may not import training"),
        (
            {"vit/merge.py": "def f():\n    from lily_lightning.studies.plots import x\n"},
            "vit may not import studies",
        ),
        ({"data/a.py": "from ..vit import inject\n"}, "data may not import vit"),
        ({"adapters/lily.py": "import timm\n"}, "adapters/ imports timm"),
        ({"vit/inject.py": "from lightning import LightningModule\n"}, "vit/ imports lightning"),
        (
            {"training/a.py": "from . import b\n", "training/b.py": "def f():\n    from .a import x\n"},
            "import cycle: lily_lightning.training.a -> lily_lightning.training.b"
            " -> lily_lightning.training.a",
        ),
        ({"newpart/a.py": "from ..errors import UsageError\n"}, "newpart has no layer"),
    ],
)
def test_the_check_finds_each_kind_of_wrong_import(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    root = write_tree(tmp_path / "lily_lightning", {"__init__.py": "", "errors.py": "", **files})
    problems = layout_problems(root)
    assert any(expected in p for p in problems), problems


def test_a_tree_that_keeps_the_rules_passes(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "lily_lightning",
        {
            "__init__.py": "from .training.module import M\n",
            "errors.py": "",
            "vit/inject.py": "from ..adapters import LilyConfig\nfrom ..errors import UsageError\n",
            "adapters/__init__.py": "import torch\n",
            "training/module.py": "import lightning\nfrom ..vit import inject\nfrom ..data import tasks\n",
            "data/tasks.py": "",
            "studies/sweep.py": "from ..training.module import M\n",
            "cli.py": "def main():\n    from .studies.sweep import run\n",
        },
    )
    assert layout_problems(root) == []
