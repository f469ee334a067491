"""FSDP2 and the text tower's length buckets (issue 12, item 1).

FSDP2 issues one all-gather per call of a sharded block and one reduce-scatter per
backward: every rank must call every text block equally often, whatever its captions.
Two gloo ranks whose caption lengths differ sharply (rank 0: all short; rank 1: short
plus one full-context caption) run a train step and a no-grad (val) forward under
FSDP2, wrapped as the trainer wraps (one unit per block, the root with the scalar
parameters ignored), in both text configurations (4 buckets, the CPU default, and one
bucket with loader-trimmed tokens, the CUDA default). The loss and the gradients must
equal a single-process fp64 computation of the mean of the ranks' losses; a hang fails
the test through run_on_group's timeout.
"""
from __future__ import annotations

import pytest
import torch

import clip_fast.model as cm
from clip_fast.loss import ContrastiveLoss
from tests.support.process_group import run_on_group
from tests.support.tiny_clip import assert_text_trim_is_exact

WORLD = 2
BATCH = 5  # rows per rank: more than one per bucket, fewer than 2 per bucket for 4 buckets


def _tokens(rank: int, vocab: int, context: int) -> torch.Tensor:
    """Rank 0: captions of 2-4 tokens; rank 1: the same plus one filling the context."""
    g = torch.Generator().manual_seed(100 + rank)
    lengths = torch.randint(2, 5, (BATCH,), generator=g).tolist()
    if rank == 1:
        lengths[2] = context
    tokens = torch.zeros(BATCH, context, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, : length - 1] = torch.randint(1, vocab - 1, (length - 1,), generator=g)
        tokens[row, length - 1] = vocab - 1
    return tokens


def _inputs(rank: int, model: cm.CLIP, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + rank)
    size = model.config.vision.image_size
    images = torch.randn(BATCH, 3, size, size, generator=g, dtype=torch.float64)
    tokens = _tokens(rank, model.vocab_size, model.context_length)
    return images, cm.trim_tokens(tokens) if buckets == 1 else tokens


def _model(buckets: int) -> cm.CLIP:
    torch.manual_seed(0)
    model = cm.create("tiny-vit").double()
    model.text_buckets = buckets
    return model


def _rank_loss(model, images, tokens) -> torch.Tensor:
    image_features, text_features, scale = model(images, tokens)
    return ContrastiveLoss()(image_features, text_features, scale)


def _reference(buckets: int):
    """Mean over ranks of each rank's local loss, one process, no sharding."""
    model = _model(buckets)
    losses = [_rank_loss(model, *_inputs(rank, model, buckets)) for rank in range(WORLD)]
    total = sum(losses) / WORLD
    total.backward()
    return [loss.detach() for loss in losses], {n: p.grad.clone() for n, p in model.named_parameters()}


def _shard(model: cm.CLIP) -> cm.CLIP:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for tower in (model.transformer, model.visual.transformer):
        for block in tower.resblocks[:-1]:
            fully_shard(block, mesh=mesh)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    return fully_shard(model, mesh=mesh, ignored_params=scalars)


def _fsdp_matches_reference(rank: int, world_size: int) -> None:
    for buckets in (4, 1):
        want_losses, want_grads = _reference(buckets)
        model = _shard(_model(buckets))
        images, tokens = _inputs(rank, model, buckets)
        image_features, text_features, scale = model(images, tokens)
        loss = ContrastiveLoss()(image_features, text_features, scale)
        loss.backward()  # FSDP averages the gradients over the ranks
        # fp64 throughout: differences are summation-order roundings, ~1e-15 relative
        torch.testing.assert_close(loss.detach(), want_losses[rank], rtol=1e-11, atol=1e-13)
        for name, p in model.named_parameters():
            if p.dim() == 0:  # ignored by FSDP: not reduced
                continue
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(got, want_grads[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m, name=name: f"{buckets} buckets, {name}: {m}")
        with torch.no_grad():  # val: the same block calls without autograd, twice
            for _ in range(2):
                val_features = model(images, tokens)[1]
                torch.testing.assert_close(val_features, text_features.detach(), rtol=1e-12, atol=1e-14)


def test_fsdp2_text_buckets_match_single_process_and_do_not_hang():
    run_on_group(_fsdp_matches_reference, world_size=WORLD, timeout=600)


@pytest.mark.parametrize("buckets", [1, 2, 4, 7])
@pytest.mark.parametrize("rows", [1, 3, 6, 41])
def test_fixed_bucket_count_is_exact(buckets, rows):
    # Any number of rows against any bucket count (empty buckets included): features and
    # gradients equal the untrimmed single pass, in fp64.
    model = _model(buckets)
    g = torch.Generator().manual_seed(rows)
    tokens = torch.cat([_tokens(rank, model.vocab_size, model.context_length) for rank in (0, 1)] * 5)[:rows]
    tokens = tokens[torch.randperm(len(tokens), generator=g)]

    def weighted_sum(features):  # a different weight for every entry
        return (features * torch.linspace(-1, 1, features.numel(), dtype=features.dtype).view_as(features)).sum()

    assert_text_trim_is_exact(model, tokens, weighted_sum)


def test_trim_tokens_rounds_up_to_a_multiple_of_16():
    context = 77
    for longest, want in ((1, 16), (3, 16), (16, 16), (17, 32), (64, 64), (65, 77), (77, 77)):
        tokens = torch.zeros(3, context, dtype=torch.long)
        tokens[0, longest - 1] = 9  # EOT (largest id) of the longest row
        tokens[1, 0] = 9
        assert cm.trim_tokens(tokens).shape == (3, want), longest
        assert cm.text_length_for(longest, context) == want
    with pytest.raises(ValueError, match="tokens must have shape"):
        cm.trim_tokens(torch.zeros(0, 5, dtype=torch.long))


def test_one_bucket_runs_the_width_given():
    # k = 1 never reads token values on the host: the loader-trimmed width is what runs,
    # and an untrimmed batch gives the same features (exactness of the causal trim).
    model = _model(1)
    tokens = _tokens(1, model.vocab_size, model.context_length)
    tokens[2] = tokens[0]  # all captions short now
    calls = []
    handle = model.transformer.resblocks[0].register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape)))
    with torch.no_grad():
        trimmed = model.encode_text(cm.trim_tokens(tokens))
        full = model.encode_text(tokens)
    handle.remove()
    assert calls == [(BATCH, 16, 128), (BATCH, 77, 128)]
    torch.testing.assert_close(trimmed, full, rtol=1e-10, atol=1e-12)
