"""Data-parallel wrapping of a clip_fast CLIP (torchtitan's `parallelize` step).

  ddp    DistributedDataParallel, gradients as bucket views; with bf16 parameters a comm
         hook reduces the gradient buckets in fp32 (bf16 sums lose the low bits of
         every rank's contribution);
  fsdp2  torch.distributed.fsdp.fully_shard per Transformer block / ResNet bottleneck,
         then the root; gradients reduce-scattered in fp32 (MixedPrecisionPolicy
         reduce_dtype). The 0-d parameters (logit scale and bias) stay replicated plain
         tensors whose gradients are averaged by a hook as they are accumulated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ParallelConfig:
    """How to wrap: mode 'ddp' or 'fsdp2'; param_dtype the dtype FSDP2 computes in
    (None: the parameters' own); compile: torch.compile the result."""

    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mode: str = "ddp"
    param_dtype: torch.dtype | None = None
    static_graph: bool = False
    sync_batchnorm: bool = False
    compile: bool = False


def fp32_allreduce_hook(process_group: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future:
    """DDP comm hook: average a gradient bucket in fp32, write it back in its own dtype."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    work = buffer.to(torch.float32).div_(dist.get_world_size(group))
    future = dist.all_reduce(work, group=group, async_op=True).get_future()
    return future.then(lambda fut: buffer.copy_(fut.value()[0]))


# DDP checks the hook's annotations as objects (this module's are strings).
fp32_allreduce_hook.__annotations__.update(bucket=dist.GradBucket, process_group=dist.ProcessGroup,
                                           **{"return": torch.futures.Future[torch.Tensor]})


def _average_grad_hook(param: torch.Tensor) -> None:
    if param.grad is not None:
        dist.all_reduce(param.grad)
        param.grad.div_(dist.get_world_size())


def scalar_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.dim() == 0]


def _shard_blocks(model: nn.Module, mesh, mp) -> None:
    from torch.distributed.fsdp import fully_shard

    # One FSDP unit per block. The last block of each Transformer is entered through
    # forward_one (class/EOT token only), which bypasses module hooks, so it stays in
    # the root unit, gathered with the root's parameters.
    towers = [model.transformer] + ([model.visual.transformer] if hasattr(model.visual, "transformer") else [])
    for tower in towers:
        for block in tower.resblocks[:-1]:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(model.visual, name, []):
            fully_shard(block, mesh=mesh, mp_policy=mp)


def apply_fsdp2(model: nn.Module, config: ParallelConfig) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(config.device.type, (config.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=config.param_dtype, reduce_dtype=torch.float32)
    _shard_blocks(model, mesh, mp)
    scalars = scalar_params(model)
    for p in scalars:  # fully_shard rejects 0-d parameters: replicated, averaged like DDP
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad_hook)
    return fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=set(scalars))


def apply_ddp(model: nn.Module, config: ParallelConfig) -> nn.Module:
    if config.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[config.device.index] if config.device.type == "cuda" else None,
        broadcast_buffers=False, gradient_as_bucket_view=True, static_graph=config.static_graph)
    if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        ddp.register_comm_hook(None, fp32_allreduce_hook)
    return ddp


def parallelize(model: nn.Module, config: ParallelConfig) -> nn.Module:
    """DDP or FSDP2 when world_size > 1 (see the module docstring); torch.compile when asked."""
    if config.mode not in ("ddp", "fsdp2"):
        raise ValueError(f"mode must be 'ddp' or 'fsdp2', got {config.mode!r}")
    if config.world_size > 1:
        model = apply_fsdp2(model, config) if config.mode == "fsdp2" else apply_ddp(model, config)
    if config.compile:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The CLIP inside torch.compile / DDP wrappers (FSDP2 modules are the CLIP itself)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)
