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


# --------------------------------------------------------------------------------------------
# the layout by role (RecBole's own: config, data, model, trainer, evaluator, quick_start, utils)

#: layers, lowest first: a package may import from its own layer and the layers below it only
LAYERS = [("utils",), ("config", "towers"), ("data",), ("model",), ("evaluator", "trainer"), ("serving",),
          ("quick_start",)]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def test_imports_point_one_way_through_the_layers():
    """utils <- config, towers <- data <- model <- evaluator, trainer <- serving <- quick_start
    (function-level imports included; the top-level entry modules may import anything)."""
    for name, deps in _imports().items():
        mine = _layer(name)
        if mine is None:
            continue
        for d in deps:
            theirs = _layer(d)
            assert theirs is None or theirs <= mine, f"{name} (layer {LAYERS[mine]}) imports {d} (layer {LAYERS[theirs]})"


def test_a_handful_of_top_level_modules_and_no_two_modules_with_one_name():
    loose = sorted(p.name for p in PKG.glob("*.py"))
    assert len(loose) <= 5, loose
    # (a package may hold a module of its own name, as RecBole's recbole/trainer/trainer.py)
    names = [p.stem for p in PKG.rglob("*.py") if p.stem != "__init__"]
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"module names used twice: {twice}"


def test_no_module_over_700_lines_and_no_function_over_100():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert text.count("\n") <= 700, f"{path.relative_to(REPO)}: {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 100, f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines"


def test_nothing_cites_a_file_outside_the_repository():
    """Users have the repository only: no internal design note, no ../shared in code or user docs."""
    pattern = re.compile(r"iisan-method\.md|architecture\.md(?!\))|style\.md|recbole-notes\.md|\.\./shared")
    docs = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "results").glob("**/README.md"),
            *(REPO / "benchmarks").glob("*.md")]
    for path in [*PKG.rglob("*.py"), *PKG.parent.glob("properties/**/*.yaml"), *docs]:
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "docs/architecture.md" in line:
                line = line.replace("docs/architecture.md", "")
            assert not pattern.search(line), f"{path.relative_to(REPO)}:{i}: {line.strip()[:120]}"


def test_a_front_page_docs_by_topic_a_license_and_a_citation():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.count("\n") <= 300, f"README.md has {readme.count(chr(10))} lines"
    assert len(list((REPO / "docs").glob("*.md"))) >= 4
    assert (REPO / "docs" / "architecture.md").is_file()
    assert (REPO / "LICENSE").is_file() and "MIT" in (REPO / "LICENSE").read_text()
    assert (REPO / "CITATION.cff").is_file()
