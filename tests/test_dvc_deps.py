"""dvc.yaml stays honest: every module of mnist_vae a stage's script imports, directly or through
another module, is covered by the stage's deps, and `dvc status` reports it changed."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, copy_project, run

PACKAGE = "mnist_vae"
PACKAGE_DIR = Path("src") / PACKAGE


def imported_modules(script: Path, root: Path = ROOT) -> set[Path]:
    """The package's module files that `script` imports, directly or not (also imports inside
    functions), relative to root. A submodule's import also runs the package's __init__.py."""
    found: set[Path] = set()
    todo = [root / script]
    while todo:
        source = todo.pop()
        in_package = source.parent == root / PACKAGE_DIR
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level and in_package:  # from .x import y / from . import x
                    base = ".".join([PACKAGE, node.module] if node.module else [PACKAGE])
                else:
                    base = node.module or ""
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] != PACKAGE:
                    continue
                for depth in range(1, len(parts) + 1):  # mnist_vae, mnist_vae.x: each one runs
                    folder = PACKAGE_DIR.joinpath(*parts[1:depth])
                    for module in (folder / "__init__.py", folder.with_suffix(".py")):
                        if depth > 1 and module.name == "__init__.py":
                            continue  # the package is flat: no subpackages
                        if (root / module).is_file() and module not in found:
                            found.add(module)
                            todo.append(root / module)
    return found


def stages(root: Path = ROOT) -> dict[str, dict]:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def script_of(stage: dict) -> Path:
    """The script of a `python pipeline/x.py ...` command."""
    words = stage["cmd"].split()
    assert words[0] == "python" and words[1].endswith(".py"), stage["cmd"]
    return Path(words[1])


def dep_paths(stage: dict) -> list[Path]:
    return [Path(dep if isinstance(dep, str) else next(iter(dep))) for dep in stage["deps"]]


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


def importers(module: Path, root: Path = ROOT) -> set[str]:
    return {name for name, stage in stages(root).items() if module in imported_modules(script_of(stage), root)}


def test_import_scan_follows_relative_and_indirect_imports():
    # pipeline/evaluate.py reaches model.py and errors.py only through other modules: the kind of
    # chain that hand-written deps once missed.
    modules = imported_modules(Path("pipeline/evaluate.py"))
    assert {PACKAGE_DIR / "__init__.py", PACKAGE_DIR / "process.py", PACKAGE_DIR / "evaluate.py",
            PACKAGE_DIR / "quality.py", PACKAGE_DIR / "model.py", PACKAGE_DIR / "errors.py"} <= modules
    assert imported_modules(Path("pipeline/download.py")) >= {PACKAGE_DIR / "download.py"}


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_stage_depends_on_its_script_and_the_whole_package(name):
    """The rule dvc.yaml states: whatever a stage imports, directly or not, a change reruns it.
    The whole package, not the modules a scan finds: a lazy import inside a function counts too."""
    stage = stages()[name]
    deps = dep_paths(stage)
    assert script_of(stage) in deps and PACKAGE_DIR in deps, f"{name}: deps {deps}"


@pytest.mark.slow
def test_touching_a_module_makes_dvc_status_report_the_stages_that_import_it(trained_once, tmp_path):
    project = copy_project(trained_once, tmp_path / "project")
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
    # A leaf every stage imports, the two that evaluate and figures reach only indirectly, and
    # the modules of one stage each.
    for module in ("paths.py", "files.py", "train.py", "download.py", "quality.py", "figures.py"):
        path = project / PACKAGE_DIR / module
        original = path.read_text()
        path.write_text(original + "# touched\n")
        reported = set(json.loads(run(["dvc", "status", "--json"], project).stdout))
        path.write_text(original)
        expected = importers(PACKAGE_DIR / module, project)
        assert expected, module
        assert expected <= reported, f"{module}: imported by {sorted(expected)}, dvc status reports {sorted(reported)}"
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
