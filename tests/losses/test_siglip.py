"""clip_fast.SigLipLoss (single process, CPU torch path and CUDA kernel) against
open_clip's SigLipLoss and an fp64 reference."""
import itertools
import textwrap

import pytest
import torch
from open_clip.loss import SigLipLoss as OpenClipSigLip

import clip_fast.siglip_torch as siglip_torch
from clip_fast import SigLipLoss
from tests.support.processes import run_python


def _inputs(B, D, dtype, scale, bias, normalise=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, D, generator=g, dtype=torch.float64)
    text = torch.randn(B, D, generator=g, dtype=torch.float64)
    if normalise:
        image = torch.nn.functional.normalize(image, dim=-1)
        text = torch.nn.functional.normalize(text, dim=-1)
    leaves = [image.to(device, dtype).requires_grad_(), text.to(device, dtype).requires_grad_(),
              torch.tensor(scale, device=device).requires_grad_()]
    leaves.append(None if bias is None else torch.tensor(bias, device=device).requires_grad_())
    return leaves


def _loss_and_grads(loss_fn, image, text, scale, bias, cast=None):
    """Loss and gradients w.r.t. (image, text, scale[, bias]); `cast` maps the leaves
    first (e.g. to fp64 for the reference) while gradients still reach the leaves."""
    leaves = [x for x in (image, text, scale, bias) if x is not None]
    args = [None if x is None else (cast(x) if cast else x) for x in (image, text, scale, bias)]
    loss = loss_fn(*args)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


GRID = [
    # (B, D, scale, bias, normalise)
    (1, 1, 1.0, None, True),
    (2, 7, 14.3, -10.0, True),
    (3, 64, 100.0, -10.0, False),
    (17, 512, 10.0, -10.0, True),
    (128, 1152, 14.3, None, True),
    (1000, 64, 100.0, -5.0, True),
    (257, 7, 1.0, 0.5, False),
]


@pytest.mark.parametrize("B,D,scale,bias,normalise", GRID)
def test_matches_open_clip_and_fp64_fp32(B, D, scale, bias, normalise, cpu_backend):
    leaves = _inputs(B, D, torch.float32, scale, bias, normalise)
    ours, ours_g = _loss_and_grads(SigLipLoss(), *leaves)
    ref, ref_g = _loss_and_grads(OpenClipSigLip(), *leaves, cast=lambda x: x.double())
    oc, oc_g = _loss_and_grads(OpenClipSigLip(), *leaves)
    assert ours.dtype == torch.float32
    assert _rel_err(ours, ref) < 1e-5
    for mine, exact, theirs in zip(ours_g, ref_g, oc_g):
        # at least as close to fp64 as open_clip's own fp32 computation (+ fp32 eps slack)
        assert _rel_err(mine, exact) <= 2 * _rel_err(theirs, exact) + 2e-5
    assert _rel_err(ours, oc) < 1e-5


@pytest.mark.parametrize("B,D", [(1, 1), (5, 3), (9, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_fp64(B, D, with_bias):
    image, text, scale, bias = _inputs(B, D, torch.float64, 3.0, -1.5 if with_bias else None, normalise=False)
    scale = scale.double().detach().requires_grad_()
    bias = None if bias is None else bias.double().detach().requires_grad_()
    args = (image, text, scale) + ((bias,) if with_bias else ())
    fn = (lambda i, t, s, b: SigLipLoss()(i, t, s, b)) if with_bias else (lambda i, t, s: SigLipLoss()(i, t, s, None))
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_torch_error(dtype, cpu_backend):
    leaves = _inputs(300, 96, dtype, 14.3, -10.0)
    ours, ours_g = _loss_and_grads(SigLipLoss(), *leaves)
    ref, ref_g = _loss_and_grads(OpenClipSigLip(), *leaves, cast=lambda x: x.double())
    oc, oc_g = _loss_and_grads(OpenClipSigLip(), *leaves)  # same-dtype torch computation
    assert _rel_err(ours, ref) <= 2 * _rel_err(oc, ref) + 1e-6
    for mine, exact, theirs in zip(ours_g, ref_g, oc_g):
        assert mine.dtype == exact.dtype
        assert _rel_err(mine, exact) <= 2 * _rel_err(theirs, exact) + 1e-6


def test_tiled_path_places_positives_on_the_global_diagonal(monkeypatch):
    # force 3 x 5 tiles: the diagonal of tile (r0, c0) sits at offset r0 - c0
    monkeypatch.setattr(siglip_torch, "CPU_TILE_ROWS", 3)
    monkeypatch.setattr(siglip_torch, "CPU_TILE_ELEMENTS", 15)
    leaves = _inputs(20, 5, torch.float64, 7.0, -2.0, normalise=False)
    ours, ours_g = _loss_and_grads(SigLipLoss(), *leaves)
    ref, ref_g = _loss_and_grads(OpenClipSigLip(), *leaves)
    assert torch.allclose(ours, ref, rtol=1e-12)
    for mine, theirs in zip(ours_g, ref_g):
        assert torch.allclose(mine, theirs, rtol=1e-10, atol=1e-14)


def test_output_dict_scale_as_number_and_grad_output_scaling():
    image, text, scale, bias = _inputs(33, 16, torch.float32, 10.0, -10.0)
    out = SigLipLoss()(image, text, scale, bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    ref = OpenClipSigLip()(image, text, 10.0, -10.0)
    assert torch.allclose(SigLipLoss()(image, text, 10.0, -10.0), ref, rtol=1e-6)
    # backward with grad_output != 1 scales every gradient (fused backward just rescales)
    g1 = torch.autograd.grad(out["contrastive_loss"] * 3.0, (image, text, scale, bias))
    g2 = torch.autograd.grad(OpenClipSigLip()(image, text, scale, bias) * 3.0, (image, text, scale, bias))
    for a, b in zip(g1, g2):
        assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize("where", ["image", "text", "scale", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_gives_nan_loss(where, value, cpu_backend):
    image, text, scale, bias = [x.detach() for x in _inputs(8, 4, torch.float32, 10.0, -10.0)]
    if where == "image":
        image[3, 1] = value
    elif where == "text":
        text[5, 0] = value
    elif where == "scale":
        scale = torch.tensor(value)
    else:
        bias = torch.tensor(value)
    assert torch.isnan(SigLipLoss()(image, text, scale, bias))


def test_bad_inputs_raise_naming_the_argument():
    x = torch.randn(4, 8)
    loss = SigLipLoss()
    cases = [
        ((torch.randn(4), x, 1.0, 0.0), "image_features"),
        ((x, torch.randn(4, 8, 1), 1.0, 0.0), "text_features"),
        ((x, torch.randn(5, 8), 1.0, 0.0), "same shape"),
        ((x, x.double(), 1.0, 0.0), "same dtype"),
        ((x.long(), x.long(), 1.0, 0.0), "image_features"),
        ((x, x, torch.ones(2), 0.0), "logit_scale"),
        ((x, x, 1.0, torch.ones(1, 2)), "logit_bias"),
        ((x[:, :0], x[:, :0], 1.0, 0.0), "image_features"),  # B = 0 is allowed: NaN, as open_clip
    ]
    for args, word in cases:
        with pytest.raises(ValueError, match=word):
            loss(*args)
    with pytest.raises(TypeError, match="logit_scale"):
        loss(x, x, "2", 0.0)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank"):
        SigLipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="process group"):
        SigLipLoss(rank=0, world_size=2)(x, x, 1.0, 0.0)


def test_peak_memory_has_no_b_squared_term():
    # B = 8192: one fp32 B x B matrix is 256 MiB (open_clip holds several); the
    # blockwise loss needs O(B*D) for gradients plus one ~4 MiB chunk of rows.
    script = textwrap.dedent(
        """
        import resource, torch
        from clip_fast import SigLipLoss
        torch.set_num_threads(2)
        B, D = 8192, 64
        i = torch.randn(B, D, requires_grad=True); t = torch.randn(B, D, requires_grad=True)
        s = torch.tensor(10.0, requires_grad=True); b = torch.tensor(-10.0, requires_grad=True)
        SigLipLoss()(i[:64], t[:64], s, b).backward()  # warm up allocator / code paths
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        SigLipLoss()(i, t, s, b).backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    result = run_python(["-c", script], timeout=300)
    assert result.returncode == 0, result.stderr
    extra = int(result.stdout.strip().splitlines()[-1])
    assert extra < 64 * 2**20, f"peak extra memory {extra / 2**20:.1f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,D", [(1, 1), (77, 7), (1000, 512), (4097, 1152)])
def test_cuda_kernel_matches_open_clip(dtype, B, D):
    leaves = _inputs(B, D, dtype, 14.3, -10.0, device="cuda")
    ours, ours_g = _loss_and_grads(SigLipLoss(), *leaves)
    ref, ref_g = _loss_and_grads(OpenClipSigLip(), *leaves, cast=lambda x: x.double())
    oc, oc_g = _loss_and_grads(OpenClipSigLip(), *leaves)
    slack = 1e-5 if dtype == torch.float32 else 1e-4
    assert _rel_err(ours, ref) <= 2 * _rel_err(oc, ref) + slack
    for mine, exact, theirs in zip(ours_g, ref_g, oc_g):
        assert _rel_err(mine, exact) <= 2 * _rel_err(theirs, exact) + slack


@pytest.mark.gpu
def test_cuda_peak_memory_linear_in_batch():
    B, D = 65536, 512
    image, text, scale, bias = _inputs(B, D, torch.bfloat16, 10.0, -10.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    SigLipLoss()(image, text, scale, bias).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * B * D * 4  # a few (B, D) fp32 buffers; B^2 bf16 alone would be 8 GiB
