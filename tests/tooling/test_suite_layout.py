"""The test suite's own layout: every test file sits in an area package under tests/
(losses, model, optim, data, train, kernels, tooling), and tests import shared helpers
by package path (`from tests.support.<module> import ...`), never by a bare module name
that only resolves because pytest put a tests/ folder on sys.path."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def python_files() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def test_every_test_file_is_in_an_area_package():
    misplaced = []
    for path in python_files():
        if not path.name.startswith("test_"):
            continue
        folders = path.relative_to(TESTS).parents
        if len(folders) < 2:
            misplaced.append(f"{path.relative_to(TESTS)}: at the top of tests/, not in an area folder")
        for folder in folders:
            if not (TESTS / folder / "__init__.py").is_file():
                misplaced.append(f"{path.relative_to(TESTS)}: tests/{folder} has no __init__.py")
    assert not misplaced, "\n".join(misplaced)


def test_no_test_module_is_imported_by_its_bare_name():
    local_names = {p.stem for p in python_files() if p.stem != "__init__"}
    bare = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bare += [f"{path.relative_to(TESTS)}:{node.lineno}: {name}" for name in names
                     if name.split(".")[0] in local_names]
    assert not bare, "import these through tests.support (or a fixture):\n" + "\n".join(bare)
