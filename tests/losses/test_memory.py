"""No O(B^2) memory: peak extra memory of forward+backward measured in fresh processes."""
import json

import pytest

from tests.support.processes import run_python

GIB = 1 << 30


SMALL_BLOCK = 1 << 20  # 4 MiB blocks of S: small batches then tell O(block) from O(B^2)


def peak_extra_bytes(impl: str, B: int, D: int, block: int | None = None) -> int:
    extra = [] if block is None else [str(block)]
    result = run_python(["tests/support/memory_probe.py", impl, str(B), str(D), *extra])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def test_peak_memory_does_not_grow_with_batch_squared():
    D = 64
    small = peak_extra_bytes("ours", 2048, D, SMALL_BLOCK)
    large = peak_extra_bytes("ours", 16384, D, SMALL_BLOCK)
    logits_bytes = 16384 * 16384 * 4  # one fp32 B x B matrix: 1 GiB
    assert large < logits_bytes / 16, f"{large / 2**20:.0f} MiB at B=16384"
    # Quadratic growth would add ~1 GiB between the two sizes; allow only the blocks
    # (a few at a time) and O(B*D) terms.
    assert large - small < 4 * SMALL_BLOCK * 4 + 16 * 16384 * D * 4, (small, large)


def test_open_clip_needs_the_quadratic_memory_we_avoid():
    """The probe itself is sound: the materialised loss does show its B^2 buffers."""
    B = 8192
    assert peak_extra_bytes("open_clip", B, 64) > 2 * B * B * 4
    assert peak_extra_bytes("ours", B, 64, SMALL_BLOCK) < B * B * 4 / 4


@pytest.mark.slow
def test_batch_32k_dim_512_under_one_gib():
    """Acceptance: B = 32,768, D = 512, fp32 on CPU, forward+backward < 1 GiB extra
    (open_clip's ClipLoss needs > 16 GiB there)."""
    assert peak_extra_bytes("ours", 32768, 512) < GIB
