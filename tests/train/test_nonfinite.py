"""Which skipped steps count toward --max-nonfinite-steps (loop.counts_as_nonfinite),
checked against a real torch.amp.GradScaler on CPU: the steps GradScaler skips for an
overflow of the scaled gradients are not counted while the scale is > 1; a non-finite
loss always is."""
import math

import pytest
import torch

from clip_fast.train.loop import counts_as_nonfinite


def _scaled_step(init_scale: float, loss_factor: float):
    """One GradScaler step of a small linear model; returns (counted, GradScaler skipped,
    parameters unchanged)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(5, 7)).pow(2).mean() * loss_factor
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    counted = counts_as_nonfinite(loss, norm, scaler._scale)
    skipped = sum(v.item() for v in scaler._found_inf_per_device(opt).values()) > 0
    scaler.step(opt)
    scaler.update()
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return bool(counted), skipped, unchanged


def test_gradscaler_overflow_is_skipped_but_not_counted():
    # A finite loss of ~50 scaled by 3e38 overflows fp32 (max 3.4e38): GradScaler finds
    # inf in the gradients, skips the step and halves the scale.
    counted, skipped, unchanged = _scaled_step(3e38, 100.0)
    assert skipped and unchanged and not counted


def test_healthy_step_not_counted():
    counted, skipped, unchanged = _scaled_step(2.0**16, 1.0)
    assert not skipped and not unchanged and not counted


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_loss_is_counted(bad):
    counted, skipped, unchanged = _scaled_step(2.0**16, bad)
    assert skipped and unchanged and counted


@pytest.mark.parametrize("scale, expected", [(1.0, True), (0.5, True), (2.0, False), (65536.0, False)])
def test_overflow_at_scale_at_most_one_is_counted(scale, expected):
    """At a scale <= 1 the gradients were not amplified: the overflow is the model's own."""
    loss, inf_norm = torch.tensor(1.5), torch.tensor(math.inf)
    assert bool(counts_as_nonfinite(loss, inf_norm, torch.tensor([scale]))) is expected


@pytest.mark.parametrize("loss, norm, expected", [(1.0, 2.0, False), (1.0, math.inf, True), (1.0, math.nan, True),
                                                  (math.nan, 2.0, True), (math.inf, math.inf, True)])
def test_without_gradscaler_loss_or_gradient(loss, norm, expected):
    assert bool(counts_as_nonfinite(torch.tensor(loss), torch.tensor(norm), None)) is expected


@pytest.mark.parametrize("clip", [None, 0.05, 1e6])
def test_clip_factor_uses_the_norm_over_all_parameters(clip):
    """loop._grad_multiplier (one process): factor = min(1, clip / (||g|| + 1e-6)) with ||g||
    the fp64 norm over every gradient of the model, applied once; NaN for a NaN loss."""
    from types import SimpleNamespace

    from clip_fast.train.loop import _grad_multiplier

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    loss = model(torch.randn(6, 5)).pow(2).sum()
    loss.backward()
    run = SimpleNamespace(raw=model, env=SimpleNamespace(world_size=1), args=SimpleNamespace(grad_clip_norm=clip))
    factor, norm = _grad_multiplier(run, loss)
    ref = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    assert abs(float(norm) - ref) <= 8 * torch.finfo(torch.float32).eps * ref
    expected = 1.0 if clip is None else min(1.0, clip / (ref + 1e-6))
    assert abs(float(factor) - expected) <= 8 * torch.finfo(torch.float32).eps * expected
    nan_factor, _ = _grad_multiplier(run, torch.tensor(math.nan))
    assert math.isnan(float(nan_factor))
