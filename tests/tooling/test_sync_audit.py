"""A steady-state training step makes no host synchronisation (issue 12, item 7).

tests/support/sync_audit.py SyncAudit records every operation that on a GPU would make the host wait
(host reads, data-dependent shapes, tensors from Python data, host-to-device copies). A
step = model forward (clip_fast.model, in its CUDA text configuration: one bucket, tokens
trimmed on the CPU by the loader before the transfer) + loss + backward + AdamW step.
After one warm-up step (first-time checks: shapes across ranks, grad_output equality),
the audited steps must record nothing. The optimizer's step counters are CPU tensors in
a GPU run too, so reading them is not a sync (`host_tensors`).
"""
from __future__ import annotations

import pytest
import torch

import clip_fast.model as cm
from clip_fast.loss import ContrastiveLoss, reference_clip_loss
from clip_fast.optim import AdamW
from clip_fast.siglip import SigLipLoss
from tests.support.process_group import run_on_group
from tests.support.sync_audit import SyncAudit

BATCH = 6
STEPS = 3  # audited steps after the warm-up


# ------------------------------------------------------------------------ the audit itself
@pytest.mark.parametrize("name, op, kind", [
    ("item", lambda x: x.sum().item(), "host read"),
    ("tolist", lambda x: x.argmax(-1).tolist(), "host read"),
    ("bool", lambda x: bool((x > 0).any()), "host read"),
    ("nonzero", lambda x: torch.nonzero(x > 0), "data-dependent shape"),
    ("masked_select", lambda x: x[x > 0], "data-dependent shape"),
    ("unique", lambda x: torch.unique(x.round()), "data-dependent shape"),
    ("tensor from list", lambda x: x + torch.tensor([1.0, 2.0, 3.0]), "tensor from host data"),
])
def test_audit_records_each_kind(name, op, kind):
    x = torch.randn(4, 3)
    with SyncAudit() as audit:
        op(x)
    assert kind in {e.kind for e in audit.events}, audit.report()
    assert all("test_sync_audit.py" in e.where for e in audit.events)  # points at the caller


def test_audit_is_silent_on_device_side_work():
    x = torch.randn(5, 7, requires_grad=True)
    idx = torch.tensor([4, 0, 2])  # made before the audit
    with SyncAudit() as audit:
        y = (x[idx].softmax(-1) * torch.arange(7.0)).sum() + torch.where(x > 0, x, 0).sum()
        y.backward()
        torch.full_like(y, float("nan"))
    assert not audit.events, audit.report()


def test_audit_ignores_declared_host_tensors():
    counter = torch.tensor(3.0)
    with SyncAudit(host_tensors=[counter]) as audit:
        int(counter.item())
    assert not audit.events
    with SyncAudit() as audit:
        int(counter.item())
    assert [e.kind for e in audit.events] == ["host read"]


# ---------------------------------------------------------------------- a training step
def _batch(model: cm.CLIP, seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and loader-side tokens: captions of 3-40 tokens, EOT = the largest id,
    zero padding to the context, trimmed on the CPU as the loader does."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision.image_size
    images = torch.randn(BATCH, 3, size, size, generator=g)
    tokens = torch.zeros(BATCH, model.context_length, dtype=torch.long)
    for row, length in enumerate(torch.randint(3, 41, (BATCH,), generator=g).tolist()):
        tokens[row, : length - 1] = torch.randint(1, vocab - 1, (length - 1,), generator=g)
        tokens[row, length - 1] = vocab - 1
    return images, cm.trim_tokens(tokens)


def _setup(model_name: str, siglip: bool, rank: int = 0, world_size: int = 1, **loss_kwargs):
    torch.manual_seed(0)
    bias = {"init_logit_bias": -10.0} if siglip else {}
    model = cm.create(model_name, **bias)
    model.text_buckets = 1  # the CUDA configuration
    if siglip:
        loss_fn = SigLipLoss(rank=rank, world_size=world_size)
    else:
        loss_fn = ContrastiveLoss(rank=rank, world_size=world_size, **loss_kwargs)
    return model, loss_fn, AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def _step(model, loss_fn, optimizer, images, tokens) -> torch.Tensor:
    out = model(images, tokens)
    loss = loss_fn(*out)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _audited_steps(model, loss_fn, optimizer, seed: int) -> SyncAudit:
    """One warm-up step, then STEPS audited steps on fresh batches (made outside the audit,
    as the loader makes them)."""
    vocab = model.vocab_size
    _step(model, loss_fn, optimizer, *_batch(model, seed, vocab))
    batches = [_batch(model, seed + 1 + i, vocab) for i in range(STEPS)]
    counters = [s["step"] for s in optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]
    losses = []
    with SyncAudit(host_tensors=counters) as audit:
        for images, tokens in batches:
            losses.append(_step(model, loss_fn, optimizer, images, tokens))
    assert all(torch.isfinite(loss) for loss in losses)
    return audit


# Host reads in CPU-only implementations owned elsewhere, which a GPU step does not run
# (the Triton kernels replace them): the torch fallback of lse_stats tests its shared
# shift range on the host, the torch path of AdamW counts non-finite gradients with
# int(), SigLIP's CPU tile paths (C++ and torch) pass scale and bias to the tile kernel and
# scale/n to addmm_ as Python numbers. They are allowed here by call site; anything else
# fails the tests.
CPU_FALLBACK_SYNCS = (
    ("clip_fast/contrastive_torch.py", "SHARED_SHIFT_RANGE"),
    ("clip_fast/adamw_torch.py", "int((~finite).sum())"),
    ("clip_fast/siglip_torch.py", "float(scale) * inv_n"),
    ("clip_fast/siglip_cpp.py", "float(scale), float(bias)"),
    # gloo only: the shape check's sizes are CPU tensors (NCCL: checked once per shape)
    ("clip_fast/collectives.py", "mine = torch.tensor(list(features.shape)"),
    ("clip_fast/collectives.py", "shapes = [tuple(s.tolist()) for s in shapes]"),
    ("clip_fast/collectives.py", "if not bool((g_all == g_all[0]).all()):"),
)


def _unexpected(audit: SyncAudit) -> list:
    return [e for e in audit.events if not any(f in e.where and text in e.where for f, text in CPU_FALLBACK_SYNCS)]


@pytest.mark.parametrize("model_name", ["tiny-vit", "tiny-rn"])
def test_model_step_makes_no_sync(model_name):
    # the model with a materialised loss (plain torch ops): besides the optimizer's CPU
    # fallback sites, nothing may sync
    model, _, optimizer = _setup(model_name, siglip=False)

    def loss_fn(image_features, text_features, scale):
        return reference_clip_loss(image_features, text_features, scale)

    audit = _audited_steps(model, loss_fn, optimizer, seed=1)
    unexpected = _unexpected(audit)
    assert not unexpected, "\n".join(f"{e.kind}: {e.op} at {e.where}" for e in unexpected)


@pytest.mark.parametrize("model_name", ["tiny-vit", "tiny-rn"])
@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_single_process_step_makes_no_sync(model_name, siglip):
    audit = _audited_steps(*_setup(model_name, siglip), seed=1)
    unexpected = _unexpected(audit)
    assert not unexpected, "\n".join(f"{e.kind}: {e.op} at {e.where}" for e in unexpected)


def test_audit_catches_a_sync_in_the_step():
    # The bucketed CPU text configuration reads the caption lengths on the host: the audit
    # must see it (so a zero count above means something).
    model, loss_fn, optimizer = _setup("tiny-vit", siglip=False)
    model.text_buckets = 4
    audit = _audited_steps(model, loss_fn, optimizer, seed=1)
    assert "host read" in {e.kind for e in audit.events}


def _distributed_steps(rank: int, world_size: int) -> None:
    for siglip, kwargs in ((False, {}), (False, {"local_loss": True, "gather_with_grad": True}), (True, {})):
        model, loss_fn, optimizer = _setup("tiny-vit", siglip, rank, world_size, **kwargs)
        audit = _audited_steps(model, loss_fn, optimizer, seed=10 * rank + 1)
        unexpected = _unexpected(audit)
        assert not unexpected, f"rank {rank}, siglip={siglip}, {kwargs}:\n" + "\n".join(
            f"{e.kind}: {e.op} at {e.where}" for e in unexpected)


def test_distributed_losses_make_no_sync_after_the_first_step():
    run_on_group(_distributed_steps, world_size=2, timeout=600)
