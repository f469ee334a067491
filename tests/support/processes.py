"""Shared helpers of the test suite."""
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_python(
    args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 1800, cwd: Path | str = REPO_ROOT
) -> subprocess.CompletedProcess:
    """Run `python ARGS` in a fresh process (for TRITON_INTERPRET, memory measurements)."""
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
