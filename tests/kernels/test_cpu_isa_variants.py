"""The C++ CPU kernels' lower instruction-set variants, run on this machine by capping the
ISA with CLIP_FAST_CPU_ISA (read once per process, so each variant runs in a fresh one).
AVX-512 machines otherwise never execute the AVX2 and baseline code that other users get."""
import json

import pytest
import torch

from tests.support.processes import run_python

_SCRIPT = r"""
import json, sys, torch
import clip_fast.contrastive_ops as contrastive_ops
from clip_fast import ContrastiveLoss, stochastic_round
from clip_fast.optim import AdamW
from clip_fast._ext import load_extension

assert load_extension() is not None
torch.manual_seed(0)
out = {"isa": torch.ops.clip_fast.cpu_isa()}
# contrastive loss: two 100 x 300 blocks, logits wide enough for both shift branches
contrastive_ops.CPU_BLOCK_ELEMENTS = 100 * 300
g = torch.Generator().manual_seed(1)
image = torch.randn(300, 48, generator=g) * torch.linspace(0.05, 3.0, 300)[:, None]
text = torch.nn.functional.normalize(torch.randn(300, 48, generator=g), dim=-1)
leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(), torch.tensor(20.0, requires_grad=True)]
ContrastiveLoss(local_loss=False)(*leaves).backward()
# reference: the same loss materialised in fp64
ref = [x.detach().double().requires_grad_() for x in leaves]
logits = ref[2] * ref[0] @ ref[1].T
labels = torch.arange(300)
((torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2).backward()
out["grad_err"] = [((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()).item() for a, b in zip(leaves, ref)]
# SigLIP loss (csrc/siglip_cpu.cpp): 3 x 4 tiles of 100 x 75, vs the same loss in fp64
import clip_fast.siglip_torch as siglip_torch
from clip_fast import SigLipLoss
siglip_torch.CPU_TILE_ROWS, siglip_torch.CPU_TILE_ELEMENTS = 100, 100 * 75
leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(), torch.tensor(10.0, requires_grad=True),
          torch.tensor(-10.0, requires_grad=True)]
SigLipLoss()(*leaves).backward()
ref = [x.detach().double().requires_grad_() for x in leaves]
z = 2 * torch.eye(300, dtype=torch.float64) - 1
(-torch.nn.functional.logsigmoid(z * (ref[2] * ref[0] @ ref[1].T + ref[3])).sum() / 300).backward()
out["siglip_grad_err"] = [((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()).item() for a, b in zip(leaves, ref)]
# optimizer and stochastic rounding: bit patterns, compared across variants
w = torch.nn.Parameter(torch.randn(1000, 37).bfloat16())
w.grad = torch.randn(1000, 37).bfloat16()
opt = AdamW([w], lr=1e-2, seed=3)
for _ in range(3):
    opt.step()
out["adamw"] = w.detach().view(torch.int16).sum(dtype=torch.int64).item()
out["adamw_bits"] = w.detach().view(torch.int16).flatten()[:64].tolist()
out["sr"] = stochastic_round(torch.randn(5000, generator=g), seed=7).view(torch.int16).tolist()[:256]
print(json.dumps(out))
"""


def _run(isa: str) -> dict:
    result = run_python(["-c", _SCRIPT], env_extra={"CLIP_FAST_CPU_ISA": isa}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def native() -> dict:
    return _run("auto")


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_lower_isa_variant_matches_reference_and_native(native, isa):
    capped = _run(isa)
    order = ["baseline", "avx2", "avx512"]
    # the cap never raises the ISA above the machine's, and lowers it when asked
    assert capped["isa"] == order[min(order.index(isa), order.index(native["isa"]))]
    # contrastive loss gradients: fp32-level agreement with fp64 math (scale 20, logits up to ~60)
    assert max(capped["grad_err"]) < 1e-5, capped["grad_err"]
    # SigLIP loss gradients (logits up to ~|20|, fp64 sums of fp32 tile terms)
    assert max(capped["siglip_grad_err"]) < 1e-5, capped["siglip_grad_err"]
    # AdamW and stochastic rounding are bit-identical across variants (no FMA contraction)
    assert capped["adamw"] == native["adamw"] and capped["adamw_bits"] == native["adamw_bits"]
    assert capped["sr"] == native["sr"]


def test_bad_isa_value_is_a_clear_error_not_a_crash():
    script = "from clip_fast import ContrastiveLoss; import torch; ContrastiveLoss()(torch.randn(4, 8), torch.randn(4, 8), 1.0)"
    result = run_python(["-c", script], env_extra={"CLIP_FAST_CPU_ISA": "sse9"}, timeout=600)
    assert result.returncode == 1  # a Python exception, not an abort (which would be -6)
    assert "CLIP_FAST_CPU_ISA must be auto, avx512, avx2 or baseline" in result.stderr
