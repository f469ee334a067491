"""Every function and method in clip_fast/ and kernels/ fits on a screen or two: at most
MAX_FUNCTION_LINES lines from its `def` to its last line (decorators excluded, docstring
and nested functions included)."""
import ast
from pathlib import Path

from tests.support.processes import REPO_ROOT

MAX_FUNCTION_LINES = 100
SOURCE_DIRS = ("clip_fast", "kernels")

# Functions allowed to exceed the limit, as "path:name", each with the reason it is
# still long. Empty: keep it so.
ALLOWED_LONG_FUNCTIONS: set[str] = set()


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function defined in `path`."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return found


def long_functions(paths: list[Path], root: Path) -> list[str]:
    """'path:line name (N lines)' of every function in `paths` over the limit and not allowed."""
    offenders = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        for name, line, length in function_lengths(path):
            if length > MAX_FUNCTION_LINES and f"{rel}:{name}" not in ALLOWED_LONG_FUNCTIONS:
                offenders.append(f"{rel}:{line} {name} ({length} lines)")
    return offenders


def source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO_ROOT / d).rglob("*.py"))


def test_function_lengths_are_measured_from_def_to_last_line(tmp_path):
    """The measure itself: a 5-line method inside a class inside an if, with a nested
    function; a function of MAX_FUNCTION_LINES lines passes, one line more is named."""
    source = tmp_path / "sample.py"
    source.write_text("if True:\n    class A:\n        @staticmethod\n        def f():\n"
                      '            """doc."""\n            def g():\n                return 1\n'
                      "            return g()\n")
    assert function_lengths(source) == [("A.f", 4, 5), ("A.f.g", 6, 2)]
    body = "    x = 0\n" * (MAX_FUNCTION_LINES - 2)
    (tmp_path / "fits.py").write_text(f"def fits():\n{body}    return x\n")
    (tmp_path / "long.py").write_text(f"def too_long():\n{body}    x += 1\n    return x\n")
    found = long_functions([tmp_path / "fits.py", tmp_path / "long.py"], tmp_path)
    assert found == [f"long.py:1 too_long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_function_is_longer_than_the_limit():
    files = source_files()
    assert len(files) > 20  # the walk found the package
    offenders = long_functions(files, REPO_ROOT)
    assert not offenders, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)
