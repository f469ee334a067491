"""clip_fast.GradCache: one accumulated step equals one single-pass step of the global batch.

References are independent of GradCache: the single-pass step (model(images, texts),
loss, backward) of the same global batch and, for BatchNorm models (whose statistics
are per micro-batch by design), plain autograd through one forward per micro-batch
joined by one loss. Patch dropout is on: the single pass draws its masks with one
torch.rand over the batch, which on CPU yields the same numbers as one draw per
micro-batch in order (asserted), so the comparison also checks that the replayed forward
reuses each micro-batch's masks.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from clip_fast import ContrastiveLoss, GradCache, SigLipLoss
from tests.support.tiny_clip import VOCAB, assert_relative, grads_of, make_batch, make_loss, make_model, split

EPS32 = torch.finfo(torch.float32).eps


def single_pass(model, loss_fn, images, texts) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(*model(images, texts))
    loss.backward()
    return loss.detach()


def accumulated(model, loss_fn, micro_batches, **kwargs) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    return GradCache(model, loss_fn, **kwargs).step(micro_batches)


# ----------------------------------------------------------------------------- fp64 exactness


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
@pytest.mark.parametrize("sizes", [[16, 16, 16, 16], [21, 13, 17, 13]], ids=["even", "uneven"])
def test_fp64_equals_single_pass(loss_kind, sizes):
    """tiny-vit, global batch 64 in 4 micro-batches, patch dropout 0.5, captions of mixed
    lengths: loss and every gradient within 1e-10 (relative) of the single pass."""
    model = make_model("tiny-vit", torch.float64, loss_kind == "siglip", patch_dropout=0.5)
    images, texts = make_batch(64, 64, torch.float64)
    loss_fn = make_loss(loss_kind)

    torch.manual_seed(5)
    ref_loss = single_pass(model, loss_fn, images, texts)
    ref, rng_after_single = grads_of(model), torch.get_rng_state()
    torch.manual_seed(5)
    loss = accumulated(model, loss_fn, split(images, texts, sizes))

    assert abs(float(loss - ref_loss)) <= 1e-10 * abs(float(ref_loss))
    assert_relative(grads_of(model), ref, 1e-10)
    # the step consumed the generator like the single pass (one draw per micro-batch,
    # replays restore it): also the precondition that makes the masks comparable
    assert torch.equal(torch.get_rng_state(), rng_after_single)
    # and the masks matter: another seed gives another loss
    torch.manual_seed(6)
    with torch.no_grad():
        assert abs(float(loss_fn(*model(images, texts)) - ref_loss)) > 1e-6


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
def test_fp32_equals_single_pass_to_rounding(loss_kind):
    """fp32: both steps carry rounding error against the exact (fp64) step of the same
    weights and batch; they differ only in how the batch's sums are grouped (GEMM
    blocking over 64 vs 16 rows, 4 partial gradients summed in .grad), so the
    accumulated step's error is bounded by a small multiple of the single pass's own
    error (norm over each tensor), plus a floor of a few fp32 ulps of the gradient for
    tensors whose single-pass error happens to be tiny."""
    images, texts = make_batch(64, 64, torch.float64)
    model64 = make_model("tiny-vit", torch.float64, loss_kind == "siglip", patch_dropout=0.5)
    model32 = copy.deepcopy(model64).float()
    loss_fn = make_loss(loss_kind)
    torch.manual_seed(5)
    exact_loss, exact = single_pass(model64, loss_fn, images, texts), grads_of(model64)
    torch.manual_seed(5)
    single_loss, single = single_pass(model32, loss_fn, images.float(), texts), grads_of(model32)
    torch.manual_seed(5)
    acc_loss = accumulated(model32, loss_fn, split(images.float(), texts, [16] * 4))
    acc = grads_of(model32)

    def bound(single_err: float, magnitude: float) -> float:
        return 4 * single_err + 16 * EPS32 * magnitude

    assert abs(float(acc_loss) - float(exact_loss)) <= bound(abs(float(single_loss) - float(exact_loss)),
                                                             abs(float(exact_loss)))
    for name, e in exact.items():
        err_single = float((single[name].double() - e).norm())
        err_acc = float((acc[name].double() - e).norm())
        assert err_acc <= bound(err_single, float(e.norm())), f"{name}: {err_acc:.3e} vs single {err_single:.3e}"


# ----------------------------------------------------------------------------- BatchNorm


def per_micro_batch_reference(model, loss_fn, micro_batches) -> torch.Tensor:
    """Plain autograd: one forward with grad per micro-batch (train-mode BatchNorm: per
    micro-batch statistics, running statistics updated once each), one loss over the
    concatenated features, one backward."""
    model.zero_grad(set_to_none=True)
    outs = [model(images, texts) for images, texts in micro_batches]
    image = torch.cat([o[0] for o in outs])
    text = torch.cat([o[1] for o in outs])
    loss = loss_fn(image, text, *outs[-1][2:])
    loss.backward()
    return loss.detach()


def bn_buffers(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("momentum, checkpointing", [(0.1, False), (None, True)],
                         ids=["momentum-plain", "cumulative-checkpointed"])
def test_batchnorm_statistics_once_per_micro_batch(momentum, checkpointing):
    """tiny-rn (ModifiedResNet): gradients equal plain autograd over per-micro-batch
    forwards, and every running statistic and counter equals the one left by exactly
    one train-mode forward per micro-batch (bit for bit)."""
    model = make_model("tiny-rn", torch.float64, False, image_size=32)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = momentum
    model.set_grad_checkpointing(checkpointing)
    reference = copy.deepcopy(model)
    images, texts = make_batch(16, 32, torch.float64, context=12)
    micro = split(images, texts, [4] * 4)
    loss_fn = ContrastiveLoss()

    ref_loss = per_micro_batch_reference(reference, loss_fn, micro)
    loss = accumulated(model, loss_fn, micro)
    assert abs(float(loss - ref_loss)) <= 1e-10 * abs(float(ref_loss))
    assert_relative(grads_of(model), grads_of(reference), 1e-10)
    ours, expected = bn_buffers(model), bn_buffers(reference)
    assert expected and all(int(v) == 4 for k, v in expected.items() if k.endswith("num_batches_tracked"))
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
def test_single_micro_batch_is_the_plain_step(loss_kind):
    """One micro-batch runs as the plain forward + loss + backward: loss and gradients
    bit for bit equal to plain autograd, one forward only (patch dropout draws the
    generator once, as the plain step does)."""
    model = make_model("tiny-vit", torch.float32, loss_kind == "siglip", patch_dropout=0.5)
    images, texts = make_batch(16, 64, torch.float32, context=12)
    loss_fn = make_loss(loss_kind)
    torch.manual_seed(3)
    ref_loss = single_pass(model, loss_fn, images, texts)
    ref, rng_after = grads_of(model), torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(3)
    loss = accumulated(model, loss_fn, [(images, texts)])
    assert len(calls) == 1 and torch.equal(loss, ref_loss) and torch.equal(torch.get_rng_state(), rng_after)
    for name, g in grads_of(model).items():
        assert torch.equal(g, ref[name]), name


# ----------------------------------------------------------------------------- precision


def test_autocast_applies_to_both_forwards():
    """bf16 autocast: the cached features are bf16 and the gradient equals plain autograd
    through the same autocast forwards, accumulated in the same micro-batch order, bit
    for bit (a replay without autocast would differ at bf16 rounding)."""
    model = make_model("tiny-vit", torch.float32, False)
    images, texts = make_batch(24, 64, torch.float32, context=16)
    micro = split(images, texts, [8] * 3)
    loss_fn = ContrastiveLoss()

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    with bf16():
        outs = [model(i, t) for i, t in micro]
    assert outs[0][0].dtype == torch.bfloat16
    image = torch.cat([o[0] for o in outs]).detach().requires_grad_()
    text = torch.cat([o[1] for o in outs]).detach().requires_grad_()
    scale = outs[0][2].detach().requires_grad_()
    ref_loss = loss_fn(image, text, scale)
    d_image, d_text, d_scale = torch.autograd.grad(ref_loss, [image, text, scale])
    model.zero_grad(set_to_none=True)
    for m, (out, rows) in enumerate(zip(outs, torch.arange(24).split(8))):
        seeds = [d_image[rows], d_text[rows]] + ([d_scale] if m == 2 else [])
        torch.autograd.backward(list(out[: len(seeds)]), seeds)
    expected = grads_of(model)

    loss = accumulated(model, loss_fn, micro, autocast=bf16)
    assert torch.equal(loss, ref_loss.detach())
    for name, g in grads_of(model).items():
        assert torch.equal(g, expected[name]), name


def test_grad_scaler_scales_every_gradient():
    """With a GradScaler of scale 2^10 every gradient is exactly 2^10 times the unscaled
    one (a power of two), and the returned loss is unscaled."""
    model = make_model("tiny-vit", torch.float64, True)
    images, texts = make_batch(16, 64, torch.float64, context=12)
    micro = split(images, texts, [8, 8])
    loss_fn = SigLipLoss()
    plain_loss = accumulated(model, loss_fn, micro)
    plain = grads_of(model)
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss = GradCache(model, loss_fn).step(micro, grad_scaler=scaler)
    assert torch.equal(loss, plain_loss)
    for name, g in grads_of(model).items():
        assert torch.equal(g, plain[name] * 2.0**10), name


# ----------------------------------------------------------------------------- open_clip


OPEN_CLIP_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8,
                   "patch_dropout": 0.5},
    "text_cfg": {"context_length": 24, "vocab_size": VOCAB, "width": 64, "heads": 2, "layers": 2},
}


def test_open_clip_model_in_a_plain_torch_loop(tmp_path):
    """An open_clip CLIP (tiny config registered with add_model_config, random weights,
    dict outputs, patch dropout) with open_clip's own ClipLoss and torch SGD: three
    accumulated steps follow the single-pass steps of the same batches, losses and
    weights within 1e-10."""
    import open_clip

    (tmp_path / "gradcache-tiny.json").write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(tmp_path / "gradcache-tiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("gradcache-tiny", pretrained=None, output_dict=True).double().train()
    reference = copy.deepcopy(model)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    cache = GradCache(model, loss_fn, device="cpu")
    for step in range(3):
        images, texts = make_batch(32, 32, torch.float64, seed=10 + step, context=24)
        torch.manual_seed(100 + step)
        ref_opt.zero_grad()
        out = reference(images, texts)
        ref_loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        ref_loss.backward()
        ref_loss = ref_loss.detach()
        ref_opt.step()

        torch.manual_seed(100 + step)
        opt.zero_grad()
        loss = cache.step(list(zip(images.chunk(4), texts.chunk(4))))
        opt.step()
        assert abs(float(loss - ref_loss)) <= 1e-10 * abs(float(ref_loss)), step
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert float((p - q).detach().norm()) <= 1e-10 * float(q.detach().norm()), name


# ----------------------------------------------------------------------------- bad input


class _NoFeatures(torch.nn.Module):
    def forward(self, images, texts):
        return images.sum()


@pytest.mark.parametrize(
    "micro_batches, message",
    [([], "at least one"), ((x for x in []), "list or tuple"), ([torch.zeros(2)], r"micro_batches\[0\]")],
)
def test_bad_micro_batches_raise(micro_batches, message):
    cache = GradCache(make_model("tiny-vit", torch.float32, False), ContrastiveLoss())
    with pytest.raises(ValueError, match=message):
        cache.step(micro_batches)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        GradCache(lambda i, t: None, ContrastiveLoss())
    with pytest.raises(ValueError, match="autocast must be a zero-argument callable"):
        GradCache(torch.nn.Linear(1, 1), ContrastiveLoss(), autocast=torch.autocast("cpu"))
    with pytest.raises(ValueError, match="model output must be"):
        GradCache(_NoFeatures(), ContrastiveLoss()).step([(torch.zeros(2, 3), torch.zeros(2, 3))])
