"""torch.distributed helpers shared by the sharded losses (contrastive and SigLIP): the
cross-rank input checks, with their once-per-shape cache, and the row-wise all-gather and
reduce-scatter of (b, ...) tensors."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# Keys of the checks already passed on a device (NCCL) group: check_group's
# (group, rank, world_size, shape, device type) and check_same_grad_output's
# ("grad_output", group, rank, world_size, shape, device type).
_CHECKED_GROUPS: set = set()


def collective_device(t: torch.Tensor, group: Optional[object] = None) -> torch.device:
    """Where a small host-side tensor for a collective on `group` must live: t's device for
    NCCL, the CPU otherwise (gloo)."""
    return t.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def check_group(features: torch.Tensor, rank: int, world_size: int, group: Optional[object] = None) -> None:
    """The process group matches (rank, world_size) and every rank holds features of
    the same (b, D); otherwise the same ValueError on every rank (the sizes are
    all-gathered first, so no rank is left waiting in a later collective).

    Host collectives (gloo: the sizes travel as CPU tensors, reading them syncs no
    device) check on every call, so a rank whose shape changes alone (an uneven last
    eval batch) is always caught. Device collectives (NCCL) check once per group and
    shape, so a training step repeating a checked shape costs no collective and no host
    sync; there every rank decides the same way as long as the ranks' shapes have agreed
    so far, and a rank whose shape changes to one only it has not seen is caught only if
    every rank's shape is new to it."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size={world_size} needs an initialised torch.distributed process group")
    process_group = group if group is not None else dist.group.WORLD
    key = (process_group, rank, world_size, tuple(features.shape), features.device.type)
    on_host = collective_device(features, group).type == "cpu"
    if key in _CHECKED_GROUPS and not on_host:
        return
    if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
        raise ValueError(
            f"rank={rank}, world_size={world_size} do not match the process group "
            f"(rank {dist.get_rank(group)} of {dist.get_world_size(group)})"
        )
    mine = torch.tensor(list(features.shape), dtype=torch.int64, device=collective_device(features, group))
    shapes = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(shapes, mine, group=group)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len(set(shapes)) != 1:
        raise ValueError(
            "image_features/text_features must have the same shape (b, D) on every rank; got "
            + ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
        )
    _CHECKED_GROUPS.add(key)


def check_same_grad_output(
    g_all: torch.Tensor, shape: torch.Size, rank: int, world_size: int, group: Optional[object] = None
) -> None:
    """RuntimeError unless every rank's grad_output (g_all, (W,), the same on every rank)
    is equal, which local_loss=True with gather_with_grad=True needs. Read on the host
    (a sync) once per group and shape on a device, like check_group (DDP gives every step
    the same); CPU tensors are checked on every call (no device to sync)."""
    key = ("grad_output", group if group is not None else dist.group.WORLD, rank, world_size,
           tuple(shape), g_all.device.type)
    if key in _CHECKED_GROUPS and g_all.device.type != "cpu":
        return
    if not bool((g_all == g_all[0]).all()):
        raise RuntimeError(
            "ContrastiveLoss(local_loss=True, gather_with_grad=True) needs the same grad_output on "
            f"every rank (as DDP training gives); got {g_all.tolist()}"
        )
    _CHECKED_GROUPS.add(key)


def all_gather_rows(x: torch.Tensor, world_size: int, group: Optional[object] = None) -> torch.Tensor:
    """(W * n, ...) concatenation over ranks of every rank's (n, ...) `x`, in rank order."""
    out = x.new_empty((world_size * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def reduce_scatter_rows(contrib: torch.Tensor, world_size: int, group: Optional[object] = None) -> torch.Tensor:
    """Sum (B, ...) contributions over ranks; return this rank's (B / W, ...) slice."""
    contrib = contrib.contiguous()
    out = contrib.new_empty((contrib.shape[0] // world_size,) + tuple(contrib.shape[1:]))
    dist.reduce_scatter_tensor(out, contrib, group=group)
    return out
