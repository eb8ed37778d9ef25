"""The package's shape: folders are the stages of the data flow, and imports only point down it.

backbone -> methods, tasks -> train -> serving -> report -> bench -> runner. A module may import
its own stage and the stages before it, never a later one; module-level imports have no cycles;
no module imports another module's private (`_name`) objects. Parsed from source, nothing run.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# stage of each top-level part of the package: lower never imports higher
STAGES = {
    "papeft.io": 0, "papeft.config_checks": 0, "papeft.paths": 0,
    "papeft.backbone": 1,
    "papeft.methods": 2, "papeft.tasks": 2,
    "papeft.train": 3,
    "papeft.serving": 4,
    "papeft.report": 5,
    "papeft.bench": 6,
    "papeft.runner": 7,
}
LINE_LIMIT = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "papeft").rglob("*.py"))}


def stage(module: str) -> int | None:
    for prefix, level in STAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            return level
    return None


def imports(name: str, path: Path, top_level_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every papeft import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("papeft"):
                out.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("papeft")]
    return out


def test_every_module_has_a_stage():
    loose = [m for m in modules() if m != "papeft" and stage(m) is None]
    assert not loose, f"modules outside every stage of STAGES: {loose}"


def test_imports_only_point_down_the_flow():
    wrong = []
    for name, path in modules().items():
        own = stage(name)
        for target, _, line in imports(name, path):
            if own is not None and stage(target) is not None and stage(target) > own:
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {target} (a later stage)")
    assert not wrong, "\n".join(wrong)


def test_no_private_imports_across_modules():
    wrong = []
    for name, path in modules().items():
        for target, names, line in imports(name, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != name:
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {private} from {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_at_module_level():
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        deps = set()
        for target, names, _ in imports(name, path, top_level_only=True):
            # `from pkg import mod` imports the submodule pkg.mod when there is one
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            deps.update(subs or ([target] if target in known else []))
        graph[name] = deps - {name}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("folder", ["src", "scripts", "tests"])
def test_files_stay_short(folder):
    root = SRC.parent / folder
    long = {str(p.relative_to(SRC.parent)): n for p in sorted(root.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > LINE_LIMIT}
    assert not long, f"files over {LINE_LIMIT} lines: {long}"
