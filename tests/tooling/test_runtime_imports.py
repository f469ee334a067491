"""Runtime code does not import the development tooling: importing any runtime module of
clip_fast in a fresh interpreter leaves clip_fast.aot (the ahead-of-time compile check)
and clip_fast.aot_signatures (its kernel configurations) out of sys.modules."""
import pkgutil

import pytest

import clip_fast.kernels
from tests.support.processes import run_python

KERNEL_MODULES = sorted(f"clip_fast.kernels.{m.name}" for m in pkgutil.iter_modules(clip_fast.kernels.__path__))
RUNTIME_MODULES = ["clip_fast", "clip_fast.loss", "clip_fast.optim", "clip_fast.model", "clip_fast.train",
                   *KERNEL_MODULES]
TOOLING = ("clip_fast.aot", "clip_fast.aot_signatures")

_PROBE = "import importlib, sys; importlib.import_module(sys.argv[1]); print(sorted(m for m in sys.modules if m in {tooling!r}))"


def _tooling_loaded_by(module: str) -> str:
    result = run_python(["-c", _PROBE.format(tooling=set(TOOLING)), module], timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_every_kernel_module_is_listed():
    assert {"clip_fast.kernels.adamw", "clip_fast.kernels.attention_pool", "clip_fast.kernels.contrastive",
            "clip_fast.kernels.siglip"} <= set(KERNEL_MODULES)


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_runtime_module_does_not_import_aot_tooling(module):
    assert _tooling_loaded_by(module) == "[]", f"importing {module} imports the AOT tooling"


def test_probe_sees_the_tooling_when_it_is_imported():
    """The probe itself can fail: importing clip_fast.aot shows both tooling modules."""
    assert _tooling_loaded_by("clip_fast.aot") == repr(sorted(TOOLING))
