"""Runs each tests/kernels/triton_interp/test_*.py in its own process under Triton's interpreter."""
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT, run_python

INTERP_FILES = sorted(p.name for p in (REPO_ROOT / "tests" / "kernels" / "triton_interp").glob("test_*.py"))


@pytest.mark.parametrize("filename", INTERP_FILES)
def test_kernels_under_triton_interpreter(filename):
    result = run_python(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path("tests") / "kernels" / "triton_interp" / filename)],
        env_extra={"TRITON_INTERPRET": "1", "CLIP_FAST_BACKEND": "triton"},
    )
    assert result.returncode == 0, f"interpreter tests in {filename} failed:\n{result.stdout}\n{result.stderr}"
    assert " passed" in result.stdout, result.stdout
