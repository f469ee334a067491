"""Every Triton kernel configuration compiles for sm_80 and sm_90 within the hardware's
limits: shared memory, no spills (LOCAL:0), tensor-core instructions where it multiplies
matrices. Runs without a GPU (docs/verification.md, rung 4)."""
import pytest

from clip_fast.aot import ARCHS, all_configs, compile_config

CONFIGS = all_configs()


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_kernel_compiles_within_limits(config, arch):
    report = compile_config(config, arch)
    assert report.problems(config.uses_tensor_cores) == [], report


def test_contrastive_aot_covers_every_configuration_its_launchers_pick():
    """Every (kernel, dtype, feature width, alignment, mode) a contrastive launcher can
    run maps to a configuration the compile check above builds: the strip kernel's
    aligned 128 x 128 tiles only with the hints they run with (`strip_is_aligned`), and
    every feature width's K/D chunk class (widths 1..2048), not only a listed few."""
    import itertools

    import torch

    from clip_fast import aot_signatures
    from clip_fast.kernels import contrastive

    names = {c.name for c in CONFIGS}
    for kind, dtype, dim, aligned in itertools.product(
        ("fwd", "bwd", "strip"), (torch.float32, torch.bfloat16, torch.float16), range(1, 2049), (False, True)
    ):
        if (aligned and dim % 16) or (kind == "strip" and dtype == torch.float32):
            continue
        cfg = contrastive.block_config(dtype, dim, kind, aligned)
        for mode in aot_signatures.contrastive_modes(kind):
            name = aot_signatures.contrastive_config(kind, dtype, cfg, mode, aligned).name
            assert name in names, f"{name} (D={dim}) is never compiled ahead of time"
