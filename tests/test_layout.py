"""The shape of the library: the imports between its modules form a house with no cycle (each
module imports only modules below it), the model and the error machinery import nothing of the
application, every script imports its entry first, no module outgrows one idea, and
docs/reliability.md's table names real tests."""

from __future__ import annotations

import ast
import graphlib
import re

import pytest

from .conftest import ROOT

PACKAGE_DIR = ROOT / "src" / "mnist_vae"
MAX_LINES = 260


def package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at the top or inside a function."""
    modules = {path.stem for path in PACKAGE_DIR.glob("*.py")}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((PACKAGE_DIR / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_vae."):
                found.add(node.module.split(".")[1])
        graph[name] = found & modules - {"__init__"}
    return graph


def test_the_imports_have_no_cycle():
    graph = package_imports()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
    assert set(order) == set(graph)


def test_the_foundations_import_nothing_of_the_application():
    graph = package_imports()
    # model.py reads alone, like pytorch/examples' vae/main.py; errors.py is under everything.
    for module in ("model", "errors", "paths", "files"):
        assert graph[module] == set(), f"{module}.py imports {sorted(graph[module])}"
    # The data side and the evaluation never reach the training or tracking side.
    for module in ("idx", "download", "data", "evaluate", "checkpoints", "quality"):
        assert not graph[module] & {"train", "train_stage", "lit", "tracking", "sweep", "study"}, module


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline").glob("*.py")), ids=lambda p: p.name)
def test_every_script_imports_its_entry_first(path):
    """entry.py's import is what makes a stop while torch imports one line, so it comes before
    every other import of a script; and no library module imports it (a notebook keeps its own
    signal handlers)."""
    tree = ast.parse(path.read_text())
    first = next(node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom))
    assert isinstance(first, ast.ImportFrom) and first.module == "mnist_vae.entry", path.name
    assert [name for name, imports in package_imports().items() if "entry" in imports] == ["__main__"]


@pytest.mark.parametrize("path", sorted(PACKAGE_DIR.glob("*.py")), ids=lambda p: p.name)
def test_no_module_outgrows_one_idea(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines: it holds two ideas"
    assert not re.search(r"^# -{20,}", path.read_text(), re.M), f"{path.name} needs a separator: two files"


def reliability_rows() -> list[tuple[str, list[str]]]:
    """(case, the tests named in its last cell) for each row of docs/reliability.md's tables."""
    rows = []
    for line in (ROOT / "docs" / "reliability.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= {"-", " "} or cells[-1] == "test":
            continue
        rows.append((cells[0], [name.strip("` ") for name in cells[-1].split(", ")]))
    return rows


def test_the_reliability_table_names_the_tests_that_run_each_case():
    rows = reliability_rows()
    assert len(rows) >= 10
    tests = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        tests[path.name] = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                         and node.name.startswith("test_")}
    named = set()
    for case, names in rows:
        for name in names:
            module, _, function = name.partition("::")
            assert function in tests.get(module, ()), f"row {case!r} names {name}, which does not exist"
            named.add(name)
    unlisted = {f"test_hardening.py::{t}" for t in tests["test_hardening.py"]} - named
    assert not unlisted, f"cases run by tests/test_hardening.py but missing from docs/reliability.md: {unlisted}"
