"""Sharded-similarity ContrastiveLoss on real CPU process groups (spawned ranks, gloo),
compared in the same processes with open_clip's ClipLoss for all four combinations of
local_loss x gather_with_grad: loss values, feature gradients per rank, and the
logit_scale gradient after DDP averaging (per rank too where open_clip's is the same
on every rank)."""
import itertools

import pytest
import torch
import torch.distributed as dist

from clip_fast import ContrastiveLoss
from clip_fast.distributed_loss import ShardSpec, sharded_contrastive_loss
from tests.support.process_group import open_clip_loss_module, run_on_group

B_LOCAL, DIM = 11, 20
FLAGS = list(itertools.product([False, True], [False, True]))  # (local_loss, gather_with_grad)


def _rank_inputs(rank, b=B_LOCAL, D=DIM):
    g = torch.Generator().manual_seed(7 + rank)
    image = torch.nn.functional.normalize(torch.randn(b, D, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(image + torch.randn(b, D, generator=g, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor(14.3, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)


def _run(loss_fn, inputs, grad_output, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    loss.backward(torch.tensor(grad_output, dtype=loss.dtype))
    return loss.detach().double(), [x.grad.double() for x in leaves]


def _ours(rank, world_size, local_loss, gather_with_grad):
    """The public drop-in, as a trainer constructs it (dispatches to the sharded loss)."""
    return ContrastiveLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)


def _theirs(rank, world_size, local_loss, gather_with_grad):
    clip_loss = open_clip_loss_module().ClipLoss(
        local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size
    )
    return lambda i, t, s, b: clip_loss(i, t, s, b)


def _ddp_mean(x):
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _compare_all_flags(rank, world_size, dtypes=((torch.float64, 1e-10), (torch.float32, 2e-5))):
    inputs = _rank_inputs(rank)
    for (local_loss, gather_with_grad), (dtype, tol) in itertools.product(FLAGS, dtypes):
        # DDP gives every rank the same grad_output; the other cases also get a
        # per-rank one, which each semantics applies differently
        same_g = local_loss and gather_with_grad
        grad_output = 1.5 if same_g else 1.0 + 0.25 * rank
        what = (rank, local_loss, gather_with_grad, dtype)
        ours, ours_g = _run(_ours(rank, world_size, local_loss, gather_with_grad), inputs, grad_output, dtype)
        ref, ref_g = _run(_theirs(rank, world_size, local_loss, gather_with_grad), inputs, grad_output, dtype)
        assert _rel(ours, ref) < tol, what
        assert _rel(ours_g[0], ref_g[0]) < tol, ("image grad",) + what
        assert _rel(ours_g[1], ref_g[1]) < tol, ("text grad",) + what
        assert _rel(_ddp_mean(ours_g[2]), _ddp_mean(ref_g[2])) < tol, ("scale grad after DDP mean",) + what
        if not same_g:  # open_clip's per-rank scale gradients coincide with ours too
            assert _rel(ours_g[2], ref_g[2]) < tol, ("scale grad",) + what
        assert ours_g[3].abs().max() == 0 and ref_g[3].abs().max() < 1e-5, ("bias grad",) + what


def _errors_are_collective(rank, world_size):
    # unequal local batches: the same ValueError on every rank, no hang
    b = B_LOCAL - 1 if rank == 0 else B_LOCAL
    image, text, scale, bias = _rank_inputs(rank, b=b)
    with pytest.raises(ValueError, match="same shape"):
        sharded_contrastive_loss(image, text, scale, bias, ShardSpec(rank, world_size, False, False))
    # NaN on one rank reaches every rank's loss, as with open_clip's gathered logits
    image, text, scale, bias = _rank_inputs(rank)
    if rank == world_size - 1:
        image[0, 0] = float("nan")
    for local_loss in (False, True):
        loss = sharded_contrastive_loss(image, text, scale, bias, ShardSpec(rank, world_size, local_loss, False))
        assert torch.isnan(loss)
    # local_loss + gather_with_grad with different grad_outputs: raised on every rank
    image, text, scale, bias = [x.requires_grad_() for x in _rank_inputs(rank)]
    loss = sharded_contrastive_loss(image, text, scale, bias, ShardSpec(rank, world_size, True, True))
    with pytest.raises(RuntimeError, match="same grad_output"):
        loss.backward(torch.tensor(1.0 + rank, dtype=loss.dtype))
    check = torch.ones(1)
    dist.all_reduce(check)  # the group still works
    assert check.item() == world_size


def _one_pass_each_way(rank, world_size):
    """Every flag combination costs one forward pass (lse_stats) and one backward
    pass (logit_grads, 3 matmul-sized passes over S_r): 4 in all per rank."""
    import clip_fast.distributed_loss as module

    calls = []
    originals = module.lse_stats, module.logit_grads
    module.lse_stats = lambda *a, **k: calls.append("fwd") or originals[0](*a, **k)
    module.logit_grads = lambda *a, **k: calls.append("bwd") or originals[1](*a, **k)
    try:
        for local_loss, gather_with_grad in FLAGS:
            calls.clear()
            _run(_ours(rank, world_size, local_loss, gather_with_grad), _rank_inputs(rank), 1.0, torch.float32)
            assert calls == ["fwd", "bwd"], (local_loss, gather_with_grad, calls)
    finally:
        module.lse_stats, module.logit_grads = originals


def _all_checks(rank, world_size):
    _compare_all_flags(rank, world_size)
    # large batches merge the column statistics with two all-reduces instead of one gather
    import clip_fast.distributed_loss as module

    limit, module.GATHER_MERGE_LIMIT = module.GATHER_MERGE_LIMIT, 0
    try:
        _compare_all_flags(rank, world_size, dtypes=((torch.float64, 1e-10),))
    finally:
        module.GATHER_MERGE_LIMIT = limit
    _errors_are_collective(rank, world_size)
    _one_pass_each_way(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_loss_matches_open_clip_for_every_flag_combination(world_size):
    run_on_group(_all_checks, world_size)
