"""Every loss returns the same value, and the same gradients, inside torch.autocast as
outside, for the same input tensors (fp32 or half): the losses' forward and backward
run with autocast off, so no op is silently downcast (the diagonal term S[i,i] once
went through a bf16 bmm under CPU autocast: 2.7e-4 off instead of 4e-8).

Bitwise equality on CPU (same ops, same order); on GPU a tolerance of fp32 rounding
(the Triton kernels may accumulate in a different order between calls)."""
import pytest
import torch
import torch.distributed as dist

from clip_fast import ContrastiveLoss, SigLipLoss
from tests.support.process_group import run_on_group

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOSSES = {
    "contrastive": lambda: (ContrastiveLoss(), False),
    "contrastive_bias": lambda: (ContrastiveLoss(), True),
    "siglip": lambda: (SigLipLoss(), True),
}


def _inputs(B, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    text = torch.nn.functional.normalize(image + torch.randn(B, D, generator=g), dim=-1)
    return [image.to(device, dtype), text.to(device, dtype),
            torch.tensor(14.3, device=device), torch.tensor(-3.0, device=device)]


def _loss_and_grads(loss_fn, with_bias, inputs, autocast_dtype=None):
    """Loss and gradients, forward and backward both inside autocast when asked."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    args = leaves if with_bias else leaves[:3]
    device_type = inputs[0].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        if autocast_dtype is not None:  # the context really downcasts (else the test proves nothing)
            assert torch.mm(inputs[2].float().reshape(1, 1), inputs[2].float().reshape(1, 1)).dtype == autocast_dtype
        loss = loss_fn(*args)
        loss.backward()
    return loss.detach(), [x.grad for x in args]


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("input_dtype", INPUT_DTYPES)
@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("B,D", [(37, 24), (1, 5)])
def test_cpu_loss_is_bitwise_the_same_inside_autocast(kind, input_dtype, autocast_dtype, B, D):
    loss_fn, with_bias = LOSSES[kind]()
    inputs = _inputs(B, D, input_dtype, "cpu")
    loss, grads = _loss_and_grads(loss_fn, with_bias, inputs)
    loss_ac, grads_ac = _loss_and_grads(loss_fn, with_bias, inputs, autocast_dtype)
    assert loss_ac.dtype == loss.dtype and torch.equal(loss_ac, loss), (loss_ac.item(), loss.item())
    for g, g_ac in zip(grads, grads_ac):
        assert g_ac.dtype == g.dtype and torch.equal(g_ac, g)


def test_autocast_value_is_the_exact_value_of_the_given_tensors():
    """The issue's measurement: bf16 inputs under CPU bf16 autocast, against fp64 maths
    on the same (bf16-rounded) inputs; fp32 arithmetic over D = 64 terms and B = 64
    logsumexp terms leaves a few eps32 * (scale + log B)."""
    image, text, scale, _ = _inputs(64, 64, torch.bfloat16, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ContrastiveLoss()(image, text, scale)
    logits = scale.double() * image.double() @ text.double().T
    labels = torch.arange(64)
    ref = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    tol = 16 * torch.finfo(torch.float32).eps * (14.3 + torch.log(torch.tensor(64.0)).item())
    assert abs(loss.double() - ref).item() <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("input_dtype", INPUT_DTYPES)
@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_cuda_loss_is_the_same_inside_autocast(kind, input_dtype, autocast_dtype):
    """Same on CUDA. The kernels may sum in another order between calls (atomics), so
    the bound is fp32 rounding of B-term sums of O(scale)-sized terms:
    8 * eps32 * sqrt(B) * (scale + log B), relative to the gradients' magnitudes."""
    B, D = 300, 64
    loss_fn, with_bias = LOSSES[kind]()
    inputs = _inputs(B, D, input_dtype, "cuda")
    loss, grads = _loss_and_grads(loss_fn, with_bias, inputs)
    loss_ac, grads_ac = _loss_and_grads(loss_fn, with_bias, inputs, autocast_dtype)
    rel = 8 * torch.finfo(torch.float32).eps * B**0.5 * (14.3 + torch.log(torch.tensor(float(B))).item())
    assert loss_ac.dtype == loss.dtype
    assert abs(loss_ac - loss).item() <= rel * max(1.0, abs(loss.item()))
    for g, g_ac in zip(grads, grads_ac):
        assert g_ac.dtype == g.dtype
        # half-precision gradients add one rounding of their own dtype
        step = rel + (2 * torch.finfo(g.dtype).eps if g.dtype != torch.float32 else 0.0)
        assert (g_ac.float() - g.float()).abs().max().item() <= step * max(g.float().abs().max().item(), 1e-12)


def _sharded_losses(rank, world_size):
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            yield (f"contrastive local_loss={local_loss} gather_with_grad={gather_with_grad}",
                   ContrastiveLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                   world_size=world_size), True)
    for impl in ("bidir", "shift"):
        yield f"siglip {impl}", SigLipLoss(rank=rank, world_size=world_size, dist_impl=impl), True


def _sharded_autocast_checks(rank, world_size):
    for input_dtype in (torch.float32, torch.bfloat16):
        inputs = _inputs(13, 24, input_dtype, "cpu", seed=rank)
        for name, loss_fn, with_bias in _sharded_losses(rank, world_size):
            loss, grads = _loss_and_grads(loss_fn, with_bias, inputs)
            for autocast_dtype in AUTOCAST_DTYPES:
                loss_ac, grads_ac = _loss_and_grads(loss_fn, with_bias, inputs, autocast_dtype)
                where = f"{name}, {input_dtype} inputs, {autocast_dtype} autocast, rank {rank}"
                assert torch.equal(loss_ac, loss), (where, loss_ac.item(), loss.item())
                assert all(torch.equal(a, b) for a, b in zip(grads_ac, grads)), where
    dist.barrier()


def test_sharded_losses_are_bitwise_the_same_inside_autocast_on_two_ranks():
    run_on_group(_sharded_autocast_checks, 2)
