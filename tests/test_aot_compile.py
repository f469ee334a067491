"""Every Triton kernel configuration compiles for sm_80 and sm_90 within the hardware's
limits: shared memory, no spills (LOCAL:0), tensor-core instructions where it multiplies
matrices. Runs without a GPU (DESIGN.md §7, rung 4)."""
import pytest

from clip_fast.aot import ARCHS, all_configs, compile_config

CONFIGS = all_configs()


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_kernel_compiles_within_limits(config, arch):
    report = compile_config(config, arch)
    assert report.problems(config.uses_tensor_cores) == [], report
