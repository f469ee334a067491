"""Distributed SigLipLoss on real CPU process groups (spawned ranks, gloo), compared in
the same processes with open_clip's SigLipLoss (whose gradients travel back through its
NeighbourExchange autograd functions)."""
import pytest
import torch
import torch.distributed as dist

from clip_fast import SigLipLoss
from tests.support.process_group import open_clip_loss_module, run_on_group

OpenClipSigLip = open_clip_loss_module().SigLipLoss


def _rank_inputs(rank, b, D, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + rank)
    image = torch.nn.functional.normalize(torch.randn(b, D, generator=g, dtype=torch.float64), dim=-1)
    # matching captions correlate with their images (as after some training), so that
    # dL/dscale is not a near-total cancellation that no fp32 sum could resolve
    text = torch.nn.functional.normalize(image + torch.randn(b, D, generator=g, dtype=torch.float64), dim=-1)
    return image.to(dtype), text.to(dtype), torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype)


def _grads(loss_module, image, text, scale, bias, grad_output):
    leaves = [x.detach().clone().requires_grad_() for x in (image, text, scale, bias)]
    loss = loss_module(*leaves)
    # grad_output differs per rank: the ring backward must scale each rank's share by
    # that rank's own grad_output before sending it to the owner
    loss.backward(torch.tensor(grad_output, dtype=loss.dtype))
    return loss.detach(), [x.grad for x in leaves]


def _rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _compare_with_open_clip(rank, world_size):
    for dist_impl in ("bidir", "shift"):
        image, text, scale, bias = _rank_inputs(rank, 13, 24)
        grad_output = 1.0 + 0.5 * rank
        make = lambda cls: cls(rank=rank, world_size=world_size, dist_impl=dist_impl)  # noqa: E731
        exact, exact_g = _grads(make(OpenClipSigLip), image, text, scale, bias, grad_output)
        # fp64: the same sums as open_clip up to rounding
        ours, ours_g = _grads(make(SigLipLoss), image, text, scale, bias, grad_output)
        assert _rel_err(ours, exact) < 1e-12
        for name, mine, theirs in zip(("image", "text", "scale", "bias"), ours_g, exact_g):
            assert _rel_err(mine, theirs) < 1e-10, (rank, dist_impl, name)
        # fp32: at most twice open_clip's own fp32 error against fp64
        f32 = [x.float() for x in (image, text, scale, bias)]
        ours, ours_g = _grads(make(SigLipLoss), *f32, grad_output)
        oc, oc_g = _grads(make(OpenClipSigLip), *f32, grad_output)
        assert _rel_err(ours, exact) <= 2 * _rel_err(oc, exact) + 1e-6
        for name, mine, theirs, ex in zip(("image", "text", "scale", "bias"), ours_g, oc_g, exact_g):
            assert _rel_err(mine, ex) <= 2 * _rel_err(theirs, ex) + 1e-5, (rank, dist_impl, name)
    # the loss covers every rank's texts: equal to the single-process loss over the rows
    # of this rank against all texts, which the fp64 formula gives directly
    image, text, scale, bias = _rank_inputs(rank, 13, 24)
    all_text = torch.cat([_rank_inputs(r, 13, 24)[1] for r in range(world_size)])
    z = -torch.ones(13, 13 * world_size, dtype=torch.float64)
    z[:, 13 * rank : 13 * (rank + 1)].diagonal().fill_(1.0)
    expected = -torch.nn.functional.logsigmoid(z * (scale * image @ all_text.T + bias)).sum() / 13
    got = SigLipLoss(rank=rank, world_size=world_size)(image, text, scale, bias)
    assert torch.allclose(got, expected, rtol=1e-12)


def _unequal_batches_fail_everywhere(rank, world_size):
    b = 8 if rank == world_size - 1 else 9
    image, text, scale, bias = _rank_inputs(rank, b, 16)
    with pytest.raises(ValueError, match="same shape"):
        SigLipLoss(rank=rank, world_size=world_size)(image, text, scale, bias)
    # the group is still usable afterwards (nothing left half-sent)
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == world_size


def _all_checks(rank, world_size):
    # one spawned group per world size runs every check (spawning ranks dominates the time)
    _compare_with_open_clip(rank, world_size)
    _unequal_batches_fail_everywhere(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_matches_open_clip_and_rejects_unequal_batches_on_a_gloo_group(world_size):
    run_on_group(_all_checks, world_size)
