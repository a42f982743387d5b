"""The package's structure: arrows point one way, no import cycle, no machine paths."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "recbole_iisan"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """module -> the recbole_iisan modules it imports (anywhere in the file, functions included)."""
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recbole_iisan"):
                base = node.module
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("recbole_iisan.")}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_data_and_towers_import_nothing_from_model():
    graph = _imports()
    for name, deps in graph.items():
        if name.startswith(("recbole_iisan.data", "recbole_iisan.towers")):
            bad = {d for d in deps if d.startswith("recbole_iisan.model")}
            assert not bad, f"{name} imports {bad}"
        if name.startswith("recbole_iisan.towers"):
            bad = {d for d in deps if d.startswith(("recbole_iisan.data", "recbole_iisan.model"))}
            assert not bad, f"{name} (the frozen side) imports {bad}"


def test_no_import_cycle():
    graph = _imports()
    # packages' __init__ modules import nothing heavy; drop the root package (compat shims only)
    graph = {k: {d for d in v if d != "recbole_iisan"} for k, v in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_one_pooling_and_one_padding_function():
    """The cached and the live item sides share tokenising, padding and pooling."""
    defs = {}
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs.setdefault(node.name, []).append(_module(path))
    assert defs["pool_hidden"] == ["recbole_iisan.towers.encoders"]
    assert defs["pad_ids"] == ["recbole_iisan.towers.encoders"]
    assert not any(n in defs for n in ("pool", "_pool", "_pad", "tokenize_texts"))


def test_no_absolute_machine_path_in_code_or_tests():
    pattern = re.compile(r"['\"](/work/|/root/|/home/\w+/|/tmp/pytest)")
    for path in list(PKG.rglob("*.py")) + list((REPO / "tests").rglob("*.py")) + list((REPO / "benchmarks").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path.relative_to(REPO)}:{i}: {line.strip()}"
