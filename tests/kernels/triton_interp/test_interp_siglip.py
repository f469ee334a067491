"""The fused SigLIP Triton kernel under Triton's interpreter (TRITON_INTERPRET=1,
CLIP_FAST_BACKEND=triton), against open_clip / an fp64 reference: square blocks through
the public SigLipLoss, and the rectangular (M x N) negative-only blocks the distributed
ring feeds it, including the split-column path (several programs per row block)."""
import pytest
import torch
from open_clip.loss import SigLipLoss as OpenClipSigLip

from clip_fast import SigLipLoss
from clip_fast.kernels.siglip import grad_buffer, siglip_block


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _leaves(B, D, dtype, scale, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).to(dtype).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(scale).requires_grad_()
    b = None if bias is None else torch.tensor(bias).requires_grad_()
    return i, t, s, b


def _run(loss_fn, i, t, s, b, cast=None):
    leaves = [x for x in (i, t, s, b) if x is not None]
    args = [None if x is None else (cast(x) if cast else x) for x in (i, t, s, b)]
    loss = loss_fn(*args)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    "B,D,dtype,scale,bias",
    [
        (1, 1, torch.float32, 1.0, None),
        (3, 7, torch.float32, 100.0, -10.0),
        (70, 40, torch.float32, 14.3, -10.0),
        (65, 33, torch.bfloat16, 10.0, -10.0),
        (70, 64, torch.float16, 14.3, None),
        (17, 1152, torch.bfloat16, 100.0, -5.0),
    ],
)
def test_kernel_matches_open_clip(B, D, dtype, scale, bias):
    leaves = _leaves(B, D, dtype, scale, bias)
    ours, ours_g = _run(SigLipLoss(), *leaves)
    ref, ref_g = _run(OpenClipSigLip(), *leaves, cast=lambda x: x.double())
    oc, oc_g = _run(OpenClipSigLip(), *leaves)  # same-dtype torch computation
    slack = 2e-6 if dtype == torch.float32 else 1e-5
    assert _rel_err(ours, ref) <= 2 * _rel_err(oc, ref) + slack
    for mine, exact, theirs in zip(ours_g, ref_g, oc_g):
        assert mine.dtype == exact.dtype
        assert _rel_err(mine, exact) <= 2 * _rel_err(theirs, exact) + slack


@pytest.mark.parametrize("M,N,D,has_pos", [(64, 600, 24, False), (5, 520, 9, False), (130, 70, 16, True)])
def test_rectangular_block_and_column_split(M, N, D, has_pos):
    # N >= 8 column blocks of 64 splits each row block's columns over programs
    g = torch.Generator().manual_seed(1)
    image = torch.randn(M, D, generator=g)
    text = torch.randn(N, D, generator=g)
    scale, bias, inv_n = 3.0, -2.0, 1.0 / 37
    d_image, d_text = grad_buffer(M, D, image.device), grad_buffer(N, D, image.device)
    d_image += 1.0  # accumulators are added to, not overwritten
    stats = siglip_block(image, text, torch.tensor([scale, bias]), d_image, d_text, has_pos, inv_n)

    S = scale * image.double() @ text.double().T + bias
    z = -torch.ones(M, N, dtype=torch.float64)
    if has_pos:
        z.diagonal().fill_(1.0)
    G = -z * torch.sigmoid(-z * S) * inv_n
    assert _rel_err(stats[0], -torch.nn.functional.logsigmoid(z * S).sum() * inv_n) < 1e-6
    assert _rel_err(stats[1], (G * (S - bias) / scale).sum()) < 1e-5
    assert _rel_err(stats[2], G.sum()) < 1e-5
    assert _rel_err(d_image - 1.0, scale * G @ text.double()) < 1e-5
    assert _rel_err(d_text, scale * G.T @ image.double()) < 1e-5


def test_non_finite_gives_nan_and_unaligned_rows_are_padded():
    image = torch.randn(9, 7)
    text = torch.randn(9, 7)
    image[4, 2] = float("inf")
    assert torch.isnan(SigLipLoss()(image, text, 10.0, -10.0))
    # a column slice: row stride 11 floats (not 16-byte aligned) -> launcher pads
    wide = torch.randn(9, 11)
    i = wide[:, 1:8]
    ours = SigLipLoss()(i, text, 10.0, -10.0)
    ref = OpenClipSigLip()(i.double(), text.double(), 10.0, -10.0)
    assert _rel_err(ours, ref) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("has_pos", [False, True])
def test_gradients_keep_small_negative_pairs_at_scale_10_bias_minus_10(dtype, has_pos):
    """SigLIP's init (scale 10, bias -10): a negative pair's entry of scale * dL/dS is
    ~10 * sigmoid(-10) / B ~ 2e-6 at B = 256, subnormal in fp16 (< 6.1e-5) if the kernel
    rounded it to fp16 as is. Off-diagonal blocks (has_pos=False) are nothing else.
    Each gradient entry must match fp64 math on the same inputs to the rounding of G to
    the input dtype (relative eps/2 per entry) plus fp32 accumulation, bounded entrywise
    by that error times the magnitude sum scale * |G| @ |features|."""
    M, N, D = 64, 256, 64
    g = torch.Generator().manual_seed(16)
    image = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1).to(dtype)
    text = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype)
    scale, bias, inv_n = 10.0, -10.0, 1.0 / N
    d_image, d_text = grad_buffer(M, D, image.device), grad_buffer(N, D, image.device)
    siglip_block(image, text, torch.tensor([scale, bias]), d_image, d_text, has_pos, inv_n)

    S = scale * image.double() @ text.double().T + bias
    z = -torch.ones(M, N, dtype=torch.float64)
    if has_pos:
        z.diagonal().fill_(1.0)
    G = scale * (-z * torch.sigmoid(-z * S) * inv_n)
    unit = torch.finfo(dtype).eps / 2 + 4 * max(M, N) * torch.finfo(torch.float32).eps
    for got, exact, size in (
        (d_image, G @ text.double(), G.abs() @ text.double().abs()),
        (d_text, G.T @ image.double(), G.abs().T @ image.double().abs()),
    ):
        excess = (got.double() - exact).abs() - 2 * unit * size
        assert excess.max() <= 0, f"gradient error exceeds the rounding bound by {excess.max():.3g}"
