"""clip_fast.GradCache on 2 gloo ranks: DDP and FSDP2, each loss semantics.

Per rank: local batch 32 (global 64) in 4 micro-batches, tiny-vit in fp64 with patch
dropout, captions of mixed lengths. The reference is the single-pass step of the same
wrapped model with the same sharded loss; loss and every gradient must agree to 1e-10
relative. Under DDP a counting communication hook checks that gradients are reduced
once per step (as many bucket all-reduces as the single pass), and a counting loss that
the features are exchanged once per step (one loss call).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from clip_fast import GradCache
from tests.support.process_group import run_on_group
from tests.support.tiny_clip import assert_relative, grads_of, make_batch, make_loss, make_model, split

CONFIGS = [
    ("clip", {"local_loss": False, "gather_with_grad": False}),
    ("clip", {"local_loss": True, "gather_with_grad": False}),
    ("clip", {"local_loss": False, "gather_with_grad": True}),
    ("clip", {"local_loss": True, "gather_with_grad": True}),
    ("siglip", {}),
]


class AllreduceCounter:
    """Comm-hook state: how many bucket all-reduces DDP launched."""

    def __init__(self) -> None:
        self.calls = 0


def counting_allreduce(state: AllreduceCounter, bucket):
    state.calls += 1
    return default_hooks.allreduce_hook(None, bucket)


class CountingLoss(torch.nn.Module):
    """The loss, counting its calls."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        return self.loss(*args)


def _ddp(model):
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    counter = AllreduceCounter()
    ddp.register_comm_hook(counter, counting_allreduce)
    return ddp, counter


def _fsdp2(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for tower in (model.transformer, model.visual.transformer):
        for block in tower.resblocks[:-1]:
            fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh, ignored_params={p for p in model.parameters() if p.dim() == 0})


def _compare_ddp(rank: int, world_size: int, kind: str, flags: dict) -> None:
    images, texts = make_batch(32, 64, torch.float64, seed=1 + rank)
    siglip = kind == "siglip"
    loss_fn = CountingLoss(make_loss(kind, rank=rank, world_size=world_size, **flags))
    ref_model, ref_count = _ddp(make_model("tiny-vit", torch.float64, siglip, patch_dropout=0.5))
    torch.manual_seed(50 + rank)
    ref_model.zero_grad(set_to_none=True)
    ref_loss = loss_fn(*ref_model(images, texts))
    ref_loss.backward()

    model, count = _ddp(make_model("tiny-vit", torch.float64, siglip, patch_dropout=0.5))
    torch.manual_seed(50 + rank)
    loss_fn.calls = 0
    loss = GradCache(model, loss_fn).step(split(images, texts, [8] * 4))
    where = f"rank {rank}, {kind} {flags}"
    assert loss_fn.calls == 1, where
    assert count.calls == ref_count.calls > 0, (where, count.calls, ref_count.calls)
    assert abs(float(loss - ref_loss)) <= 1e-10 * abs(float(ref_loss)), where
    assert_relative(grads_of(model), grads_of(ref_model), 1e-10)


def _compare_fsdp2(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    images, texts = make_batch(32, 64, torch.float64, seed=1 + rank)
    loss_fn = make_loss("clip", rank=rank, world_size=world_size)
    ref_model = _fsdp2(make_model("tiny-vit", torch.float64, False, patch_dropout=0.5), mesh)
    torch.manual_seed(50 + rank)
    ref_loss = loss_fn(*ref_model(images, texts))
    ref_loss.backward()
    model = _fsdp2(make_model("tiny-vit", torch.float64, False, patch_dropout=0.5), mesh)
    torch.manual_seed(50 + rank)
    loss = GradCache(model, loss_fn).step(split(images, texts, [8] * 4))
    assert abs(float(loss - ref_loss)) <= 1e-10 * abs(float(ref_loss)), rank
    assert_relative(grads_of(model), grads_of(ref_model), 1e-10)


def _rank_fn(rank: int, world_size: int) -> None:
    for kind, flags in CONFIGS:
        _compare_ddp(rank, world_size, kind, flags)
    _compare_fsdp2(rank, world_size)
    dist.barrier()


def test_two_ranks_ddp_and_fsdp2_equal_single_pass():
    run_on_group(_rank_fn, world_size=2, timeout=600)
