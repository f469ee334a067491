"""Independent references for the contrastive-loss tests: open_clip's ClipLoss run in a
chosen dtype, and the same run in fp64 on the (already rounded) inputs."""
from __future__ import annotations

import torch
from open_clip.loss import ClipLoss


def make_inputs(B: int, D: int, dtype: torch.dtype, normalized: bool, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed + 1000 * B + D)
    image = torch.randn(B, D, generator=g, dtype=torch.float64)
    text = torch.randn(B, D, generator=g, dtype=torch.float64) + 0.5 * image  # positives correlate
    if normalized:
        image = torch.nn.functional.normalize(image, dim=-1)
        text = torch.nn.functional.normalize(text, dim=-1)
    return image.to(device=device, dtype=dtype), text.to(device=device, dtype=dtype)


def loss_and_grads(loss_fn, image, text, scale: float, bias: float | None, dtype: torch.dtype | None = None):
    """Loss and (d_image, d_text, d_scale, d_bias) of loss_fn run on copies in `dtype`."""
    dtype = dtype or image.dtype
    leaves = [image.detach().to(dtype).requires_grad_(), text.detach().to(dtype).requires_grad_()]
    s = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=image.device)
    leaves.append(s.requires_grad_())
    if bias is not None:
        b = torch.tensor(bias, dtype=s.dtype, device=image.device).requires_grad_()
        leaves.append(b)
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach().double(), [None if g is None else g.detach().double() for g in grads]


def open_clip_loss(image, text, scale, bias=None):
    return ClipLoss()(image, text, scale, bias)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def term_magnitudes(image, text, scale: float) -> tuple[float, float, float, float]:
    """Size of the terms each result is a difference of: the loss is lse - S[i,i], and a
    feature gradient is s/(2B) * (softmax - 2 onehot) @ features. A result near zero is
    a cancellation of such terms, so its rounding error scales with them, not with it."""
    B = image.shape[0]
    img, txt = image.double(), text.double()
    logits = (abs(scale) * (img @ txt.T)).abs().max().item()
    return (
        logits,
        abs(scale) * txt.abs().max().item() / B,
        abs(scale) * img.abs().max().item() / B,
        (img @ txt.T).abs().max().item(),
    )


def blockwise_floor(floor_rel: float, max_abs_logit: float) -> float:
    """Error floor of a blockwise softmax gradient, relative to its terms' magnitude.

    The blockwise method keeps only logsumexp(S) (an fp32 number of the logits' size)
    and recomputes exp(S - lse) later, so each softmax entry carries a relative error
    of about 2^-24 * max|S| (1e-5 at a logit scale of 100). open_clip keeps S and its
    log_softmax, so its floor is 2^-24 alone. The bound is 4x that estimate."""
    return max(floor_rel, 2.0**-22 * max_abs_logit)


def assert_matches(ours, torch_same_dtype, ref64, floor_rel: float, what: str, magnitude: float = 0.0) -> None:
    """flash-attention's rule: our error against the fp64 reference is at most twice the
    error of the same computation in PyTorch at the same dtype, plus a small floor
    relative to the magnitude of the result (or of the terms it is computed from)."""
    err = max_err(ours, ref64)
    torch_err = max_err(torch_same_dtype, ref64)
    bound = 2 * torch_err + floor_rel * max(ref64.abs().max().item(), magnitude, 1e-30)
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (torch same-dtype error {torch_err:.3e})"
