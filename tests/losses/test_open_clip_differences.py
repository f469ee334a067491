"""Where clip_fast's losses and open_clip's (3.x) behave differently on unusual input,
and where they deliberately match: each case run through open_clip's actual loss.

- bad input: open_clip raises whatever its matmul or cross_entropy raises (RuntimeError,
  IndexError, ValueError); clip_fast raises LossInputError, a ValueError whose message
  names the argument, which is also a RuntimeError and an IndexError, so every except
  clause written for open_clip still catches it (open_clip's SigLipLoss returns a
  number for 1-D features; clip_fast raises there too);
- batch of 0 pairs: NaN, as open_clip (a mean over no terms), with zero gradients;
- integer logit_scale / logit_bias tensors: accepted, as open_clip;
- half-precision features: open_clip returns a loss in their dtype, clip_fast in fp32
  (it computes in fp32; rounding to bf16 would throw away all but 3 digits of the
  logged loss; gradients keep the features' dtype in both)."""
import math

import pytest
import torch

from clip_fast import ContrastiveLoss, SigLipLoss
from clip_fast._checks import LossInputError
from tests.support.process_group import open_clip_loss_module

D = 8


def _pair(kind):
    """(clip_fast loss, open_clip loss, extra positional args after logit_scale)."""
    oc = open_clip_loss_module()
    if kind == "contrastive":
        return ContrastiveLoss(), oc.ClipLoss(), ()
    return SigLipLoss(), oc.SigLipLoss(), (torch.tensor(-4.0),)


def _features(B, dim=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, dim, generator=g), torch.randn(B, dim, generator=g)


BAD_INPUTS = {
    "dim mismatch": lambda: (*_features(4)[:1], torch.randn(4, 7), torch.tensor(10.0)),
    "more images than texts": lambda: (torch.randn(5, D), torch.randn(4, D), torch.tensor(10.0)),
    "more texts than images": lambda: (torch.randn(4, D), torch.randn(5, D), torch.tensor(10.0)),
    "dtype mismatch": lambda: (torch.randn(4, D), torch.randn(4, D, dtype=torch.float64), torch.tensor(10.0)),
    "1-D features": lambda: (torch.randn(D), torch.randn(D), torch.tensor(10.0)),
    "3-D features": lambda: (torch.randn(1, 4, D), torch.randn(1, 4, D), torch.tensor(10.0)),
    "integer features": lambda: (torch.ones(4, D, dtype=torch.long), torch.ones(4, D, dtype=torch.long),
                                 torch.tensor(10.0)),
    "vector logit_scale": lambda: (torch.randn(4, D), torch.randn(4, D), torch.ones(2)),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("kind", ["contrastive", "siglip"])
def test_bad_input_error_is_a_value_error_and_whatever_open_clip_raises(kind, case):
    ours, theirs, extra = _pair(kind)
    args = BAD_INPUTS[case]()
    try:
        theirs(*args, *extra)
        open_clip_error = None  # open_clip computes some number from it (SigLIP on 1-D features)
    except Exception as exc:  # noqa: BLE001 -- whatever open_clip raises is the reference
        open_clip_error = exc
    with pytest.raises(ValueError) as our_error:
        ours(*args, *extra)
    assert isinstance(our_error.value, LossInputError)
    if open_clip_error is not None:
        assert isinstance(our_error.value, type(open_clip_error)), (open_clip_error, our_error.value)
    message = str(our_error.value)
    assert "\n" not in message and any(name in message for name in ("image_features", "text_features",
                                                                     "logit_scale"))


@pytest.mark.parametrize("kind", ["contrastive", "siglip"])
def test_empty_batch_is_nan_with_zero_gradients_like_open_clip(kind):
    ours, theirs, extra = _pair(kind)
    results = []
    for loss_fn in (theirs, ours):
        image, text = (torch.zeros(0, D, requires_grad=True) for _ in range(2))
        scale = torch.tensor(10.0, requires_grad=True)
        loss = loss_fn(image, text, scale, *extra)
        loss.backward()
        results.append((loss.detach(), image.grad, scale.grad))
    (their_loss, their_dimage, their_dscale), (our_loss, our_dimage, our_dscale) = results
    assert math.isnan(their_loss.item()) and math.isnan(our_loss.item())
    assert our_loss.dtype == their_loss.dtype == torch.float32
    assert our_dimage.shape == their_dimage.shape == (0, D)
    assert our_dscale.item() == 0.0 and (their_dscale is None or their_dscale.item() == 0.0)


@pytest.mark.parametrize("kind", ["contrastive", "siglip"])
def test_integer_scale_and_bias_are_accepted_like_open_clip(kind):
    """An integer tensor scale gives the value of the same float scale, and open_clip's
    value to fp32 rounding (B = 6 terms of |S| <= 10 * |I||T| ~ 80: 16 eps32 * 80)."""
    ours, theirs, _ = _pair(kind)
    image, text = _features(6)
    int_extra = () if kind == "contrastive" else (torch.tensor(-4),)
    float_extra = () if kind == "contrastive" else (-4.0,)
    from_int = ours(image, text, torch.tensor(10), *int_extra)
    assert torch.equal(from_int, ours(image, text, 10.0, *float_extra))
    reference = theirs(image, text, torch.tensor(10), *int_extra)
    assert abs(from_int - reference).item() <= 16 * torch.finfo(torch.float32).eps * 80


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["contrastive", "siglip"])
def test_half_inputs_give_an_fp32_loss_where_open_clip_gives_their_dtype(kind, dtype):
    """The deliberate difference: the fp32 loss is the fp64 loss of the given half
    tensors to fp32 rounding (16 eps32 * (scale + log B)), which a half result could not
    be (its spacing alone is eps_half * loss); the gradients keep the inputs' dtype."""
    ours, theirs, extra = _pair(kind)
    image, text = (torch.nn.functional.normalize(x, dim=-1).to(dtype) for x in _features(32, 16))
    scale = torch.tensor(10.0)
    assert theirs(image, text, scale, *extra).dtype == dtype
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    loss = ours(*leaves, scale, *extra)
    loss.backward()
    assert loss.dtype == torch.float32
    assert all(x.grad.dtype == dtype for x in leaves)
    exact = theirs(image.double(), text.double(), scale.double(), *(e.double() for e in extra))
    assert abs(loss.double() - exact).item() <= 16 * torch.finfo(torch.float32).eps * (10 + math.log(32))
