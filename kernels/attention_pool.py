"""Fused attention pooling of CLIP's ModifiedResNet (forward and backward kernels).

OpenAI's AttentionPool2d turns the final (N, C, H, W) feature map into one vector per
image: the tokens are t_0 = mean_i x_i + pos_0 and t_l = x_l + pos_l (l = 1..HW), and a
single query q = Wq t_0 + bq per head attends over all L = HW + 1 tokens. The reference
implementation (a permute, a cat and `multi_head_attention_forward`) projects every
token to keys and values: 2*L*C*C multiply-adds per image (420 M for RN50, C = 2048).

With one query per head the projections can be moved to the other side of the
attention (exactly, not approximately):

    score_hl = q_h . (Wk_h t_l + bk_h) / sqrt(d) = u_h . t_l + const_h,
        u_h = Wk_h^T q_h / sqrt(d)                     (the constant drops out of softmax)
    out_h = sum_l p_hl (Wv_h t_l + bv_h) = Wv_h z_h + bv_h,
        z_h = sum_l p_hl t_l                           (because sum_l p_hl = 1)

so the K projection becomes one small GEMM per image on the query side (u = Wk^T q,
N*C*C in all), the V projection one on the pooled side (Wv z), and the part that
touches all L tokens is two skinny contractions against H (heads) columns:
S = T @ U^T (L x H) and Z = P^T @ T (H x C). That part is what these kernels fuse: the
mean token, the positional embedding, both contractions and the softmax run in one
program per image, so the (N, L, C) token tensor, the scores and the probabilities never
reach global memory. Total work drops from ~2*L*C^2 to ~3*C^2 + 2*L*C*H multiply-adds
per image (about 20x less for RN50). The caller (clip_fast/model/attention_pool.py)
does the GEMMs with the weights (q, u, Wv z, c_proj) in cuBLAS.

Kernels (all shapes per image n; T is the token tile built on the fly from X, T0, POS):
- `_attention_pool_fwd_kernel`, grid (N, head blocks):
      S = T @ U^T (fp32 accumulate), P = softmax over L (fp32), Z = P^T @ T, plus the
      per-head log-sum-exp for the backward.
- `_attention_pool_bwd_scores_kernel`, grid (N, head blocks):
      recompute S and dP = T @ dZ^T in one sweep over C, P = exp(S - lse),
      dS = P * (dP - rowsum(P * dP)); P and dS go to global memory ((N, L, H): small).
- `_attention_pool_bwd_tokens_kernel`, grid (N, C blocks):
      dT = P @ dZ + dS @ U and dU = dS^T @ T. One program owns a column block of one
      image's tokens for all heads, so dT is summed over heads in registers without
      atomics (deterministic).
Only x may have any strides; the launchers pass t0, pos, U and dZ contiguous.

Numerics: the token tile is formed in fp32 (x + pos) and rounded once to the input
dtype, like the reference's bf16 add; the dots run in the input dtype on tensor cores
(fp32 inputs as 3xTF32) with fp32 accumulation; softmax math is fp32 in base 2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from clip_fast.kernels.common import dot, on_device

LOG2E = tl.constexpr(1.4426950408889634)

_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Largest token count (HW + 1, padded to a power of two) one program holds on chip:
# RN50x64's 14x14 map gives L = 197 -> 256. Larger maps use the torch path.
MAX_BLOCK_L = 256


@triton.jit
def _load_tokens(
    x_ptr, t0_ptr, pos_ptr, n, c0, HW, C,
    stride_xn, stride_xl, stride_xc,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Token tile T[0:BLOCK_L, c0:c0+BLOCK_C] of image n in the input dtype.

    Row 0 is t_0 (mean token + pos_0, computed by the caller, which also needs it for
    the query); rows 1..HW are x + pos; rows past HW and columns past C are zero.
    """
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    img = (offs_l >= 1) & (offs_l <= HW)
    img_mask = img[:, None] & c_mask[None, :]
    x = tl.load(
        x_ptr + n * stride_xn + (offs_l - 1)[:, None] * stride_xl + offs_c[None, :] * stride_xc,
        mask=img_mask, other=0.0,
    )
    pos = tl.load(pos_ptr + (offs_l - 1)[:, None] * C + offs_c[None, :], mask=img_mask, other=0.0)
    t0 = tl.load(t0_ptr + n * C + offs_c, mask=c_mask, other=0.0)
    tok = tl.where(offs_l[:, None] == 0, t0.to(tl.float32)[None, :], x.to(tl.float32) + pos.to(tl.float32))
    return tok.to(x.dtype)


@triton.jit
def _head_offsets(n, offs_h, offs_c, H, C):
    """Offsets of the tile [n, offs_h, offs_c] of a contiguous (N, H, C) tensor: the
    image's int64 scalar offset, the 32-bit offsets inside the image, and the mask."""
    return n * H * C, offs_h[:, None] * C + offs_c[None, :], (offs_h < H)[:, None] & (offs_c < C)[None, :]


@triton.jit
def _attention_pool_fwd_kernel(
    x_ptr,      # (N, HW, C) image tokens (any strides: NCHW or channels_last feature maps)
    t0_ptr,     # (N, C) mean token + pos_0, contiguous
    pos_ptr,    # (HW, C) positional embedding rows 1..HW, contiguous
    u_ptr,      # (N, H, C) per-head key-side queries, scaled by 1/sqrt(d), contiguous
    z_ptr,      # (N, H, C) out: attention-pooled tokens, contiguous
    lse_ptr,    # (N, H) fp32 out: base-2 log-sum-exp of each head's scores
    HW, C, H,
    stride_xn, stride_xl, stride_xc,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,  # interpreter only: widen bf16 dot operands (see common.dot)
):
    # int64: n * stride passes 2^31 elements from ~21k RN50 images (n * L * C for
    # dtok) or ~2.7k RN50x64 ones; the image's base offsets are 64-bit scalars and the
    # offsets inside the image stay 32-bit (no wider offset tensors).
    n = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)

    # Sweep 1 over C: scores S = T @ U^T, (BLOCK_L, BLOCK_H) in fp32.
    s = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        tok = _load_tokens(x_ptr, t0_ptr, pos_ptr, n, c0, HW, C, stride_xn, stride_xl, stride_xc, BLOCK_L, BLOCK_C)
        image_hc, hc_offs, hc_mask = _head_offsets(n, offs_h, c0 + offs_c, H, C)
        u = tl.load(u_ptr + image_hc + hc_offs, mask=hc_mask, other=0.0)
        s = dot(tok, tl.trans(u), s, INPUT_PRECISION, WIDEN)

    # Softmax over the L tokens of each head (column), base 2, padded rows excluded.
    s = tl.where((offs_l <= HW)[:, None], s * LOG2E, float("-inf"))
    m = tl.max(s, axis=0)
    p = tl.exp2(s - m[None, :])
    denom = tl.sum(p, axis=0)
    p = p / denom[None, :]
    tl.store(lse_ptr + n * H + offs_h, m + tl.log2(denom), mask=h_mask)

    # Sweep 2 over C: Z = P^T @ T. P is rounded to the input dtype for the tensor
    # cores (as flash-attention does for P @ V); the accumulation stays fp32.
    p = p.to(z_ptr.dtype.element_ty)
    for c0 in range(0, C, BLOCK_C):
        tok = _load_tokens(x_ptr, t0_ptr, pos_ptr, n, c0, HW, C, stride_xn, stride_xl, stride_xc, BLOCK_L, BLOCK_C)
        z = dot(tl.trans(p), tok, None, INPUT_PRECISION, WIDEN)
        image_hc, hc_offs, hc_mask = _head_offsets(n, offs_h, c0 + offs_c, H, C)
        tl.store(z_ptr + image_hc + hc_offs, z.to(z_ptr.dtype.element_ty), mask=hc_mask)


@triton.jit
def _attention_pool_bwd_scores_kernel(
    x_ptr, t0_ptr, pos_ptr, u_ptr, lse_ptr,   # as in the forward kernel
    dz_ptr,     # (N, H, C) gradient of Z, contiguous
    p_ptr,      # (N, L, H) out, input dtype: probabilities P, contiguous
    ds_ptr,     # (N, L, H) out, input dtype: score gradients dS, contiguous
    HW, C, H,
    stride_xn, stride_xl, stride_xc,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,  # interpreter only: widen bf16 dot operands (see common.dot)
):
    """P = softmax(S) and dS = P * (dP - rowsum(P * dP)) with dP = T @ dZ^T, rounded to
    the input dtype for the tokens kernel. Grid (N, H / BLOCK_H)."""
    n = tl.program_id(0).to(tl.int64)  # int64 image offsets, see the forward kernel
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    l_mask = offs_l <= HW
    dtype = x_ptr.dtype.element_ty

    # One sweep over C: S = T @ U^T and dP = T @ dZ^T, both (BLOCK_L, BLOCK_H) fp32.
    s = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
    dp = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        tok = _load_tokens(x_ptr, t0_ptr, pos_ptr, n, c0, HW, C, stride_xn, stride_xl, stride_xc, BLOCK_L, BLOCK_C)
        image_hc, hc_offs, hc_mask = _head_offsets(n, offs_h, c0 + offs_c, H, C)
        u = tl.load(u_ptr + image_hc + hc_offs, mask=hc_mask, other=0.0)
        dz = tl.load(dz_ptr + image_hc + hc_offs, mask=hc_mask, other=0.0)
        s = dot(tok, tl.trans(u), s, INPUT_PRECISION, WIDEN)
        dp = dot(tok, tl.trans(dz.to(dtype)), dp, INPUT_PRECISION, WIDEN)
    lse = tl.load(lse_ptr + n * H + offs_h, mask=h_mask, other=0.0)
    p = tl.where(l_mask[:, None], tl.exp2(s * LOG2E - lse[None, :]), 0.0)
    # sum_l P * dP per head equals dz_h . z_h: the softmax Jacobian's diagonal term.
    delta = tl.sum(p * dp, axis=0)
    ds = p * (dp - delta[None, :])
    # P and dS go to the tensor cores in the input dtype in the second kernel anyway,
    # so they are stored rounded to it (flash-attention rounds P and dS the same way).
    image_lh = n * (HW + 1) * H  # int64 scalar: the image's first (L, H) entry
    lh_offs = offs_l[:, None] * H + offs_h[None, :]
    lh_mask = l_mask[:, None] & h_mask[None, :]
    tl.store(p_ptr + image_lh + lh_offs, p.to(dtype), mask=lh_mask)
    tl.store(ds_ptr + image_lh + lh_offs, ds.to(dtype), mask=lh_mask)


@triton.jit
def _attention_pool_bwd_tokens_kernel(
    x_ptr, t0_ptr, pos_ptr, u_ptr, dz_ptr,   # as in the kernels above
    p_ptr, ds_ptr,  # (N, L, H) from _attention_pool_bwd_scores_kernel
    dtok_ptr,   # (N, L, C) fp32 out: gradient of every token (row 0: t_0), contiguous
    du_ptr,     # (N, H, C) fp32 out: gradient of U, contiguous
    HW, C, H,
    stride_xn, stride_xl, stride_xc,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,  # interpreter only: widen bf16 dot operands (see common.dot)
):
    """dT = P @ dZ + dS @ U and dU = dS^T @ T. Grid (N, C / BLOCK_C): each program owns
    one column block of one image's tokens, loads them once and loops over the heads,
    so dT is summed over heads in registers (no atomics, deterministic)."""
    n = tl.program_id(0).to(tl.int64)  # int64 image offsets, see the forward kernel
    c0 = tl.program_id(1) * BLOCK_C
    L = HW + 1
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    l_mask = offs_l < L
    c_mask = offs_c < C
    dtype = x_ptr.dtype.element_ty
    tok = _load_tokens(x_ptr, t0_ptr, pos_ptr, n, c0, HW, C, stride_xn, stride_xl, stride_xc, BLOCK_L, BLOCK_C)
    dtok = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        lh_offs = offs_l[:, None] * H + offs_h[None, :]
        lh_mask = l_mask[:, None] & (offs_h < H)[None, :]
        p = tl.load(p_ptr + n * L * H + lh_offs, mask=lh_mask, other=0.0)
        ds = tl.load(ds_ptr + n * L * H + lh_offs, mask=lh_mask, other=0.0)
        image_hc, hc_offs, hc_mask = _head_offsets(n, offs_h, offs_c, H, C)
        u = tl.load(u_ptr + image_hc + hc_offs, mask=hc_mask, other=0.0)
        dz = tl.load(dz_ptr + image_hc + hc_offs, mask=hc_mask, other=0.0)
        # dT = P @ dZ + dS @ U ; dU = dS^T @ T
        dtok = dot(p, dz.to(dtype), dtok, INPUT_PRECISION, WIDEN)
        dtok = dot(ds, u, dtok, INPUT_PRECISION, WIDEN)
        du = dot(tl.trans(ds), tok, None, INPUT_PRECISION, WIDEN)
        tl.store(du_ptr + image_hc + hc_offs, du, mask=hc_mask)
    tl.store(dtok_ptr + n * L * C + offs_l[:, None] * C + offs_c[None, :], dtok,
             mask=l_mask[:, None] & c_mask[None, :])


KERNELS = ("fwd", "bwd_scores", "bwd_tokens")


def block_config(dtype: torch.dtype, hw: int, heads: int, kernel: str) -> dict:
    """Tile sizes and warps of `kernel` for `hw` positions (plus the mean token), `heads` heads.

    BLOCK_L holds every token of the image (softmax needs them all); it is at least 64
    so the L-major dots fill a Hopper warpgroup MMA (wgmma's M is 64). The score
    kernels keep BLOCK_L x BLOCK_H fp32 tiles in registers (S; S and dP in the
    backward), so BLOCK_H and the C chunk shrink as BLOCK_L grows; every choice below
    compiles without register spills for sm_80 and sm_90 (see clip_fast.aot_signatures).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    block_l = max(64, triton.next_power_of_2(hw + 1))
    if block_l > MAX_BLOCK_L:
        raise ValueError(f"attention pooling over {hw} positions exceeds the kernel's {MAX_BLOCK_L - 1}")
    block_h = max(16, min(triton.next_power_of_2(heads), 2048 // block_l))
    wide = dtype != torch.float32
    if kernel == "bwd_tokens":
        block_c = 64 if wide and block_l <= 64 else 32
    else:
        block_c = 32 if wide and block_l <= 128 else 16
    return dict(BLOCK_L=block_l, BLOCK_H=block_h, BLOCK_C=block_c, num_warps=8, num_stages=1)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: 3xTF32 keeps ~fp32 accuracy on tensor cores (plain TF32 would not
    # match an fp32 reference to 1e-5).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _check(x: torch.Tensor, t0: torch.Tensor, pos: torch.Tensor, u: torch.Tensor) -> None:
    if x.dtype not in _TL_DTYPE:
        raise TypeError(f"attention_pool: x must be fp32/bf16/fp16, got {x.dtype}")
    n, hw, c = x.shape
    if t0.shape != (n, c) or pos.shape != (hw, c) or u.dim() != 3 or u.shape[0] != n or u.shape[2] != c:
        raise ValueError(
            f"attention_pool: shapes x {tuple(x.shape)}, t0 {tuple(t0.shape)}, pos {tuple(pos.shape)}, "
            f"u {tuple(u.shape)} do not fit (N, HW, C), (N, C), (HW, C), (N, H, C)"
        )
    if t0.dtype != x.dtype or pos.dtype != x.dtype or u.dtype != x.dtype:
        raise TypeError("attention_pool: x, t0, pos and u must share one dtype")


def _launch(kernel, grid, cfg: dict, *args) -> None:
    with on_device(args[0]):
        kernel[grid](
            *args, BLOCK_L=cfg["BLOCK_L"], BLOCK_H=cfg["BLOCK_H"], BLOCK_C=cfg["BLOCK_C"],
            INPUT_PRECISION=cfg["INPUT_PRECISION"], WIDEN=args[0].dtype == torch.bfloat16 and not args[0].is_cuda,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def attention_pool_forward(
    x: torch.Tensor, t0: torch.Tensor, pos: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Z (N, H, C) in x's dtype and the fp32 base-2 log-sum-exp (N, H) of the scores.

    x (N, HW, C) any strides; t0 (N, C) mean token + pos_0; pos (HW, C) rows 1..HW of
    the positional embedding; u (N, H, C) key-side queries already scaled by 1/sqrt(d).
    """
    _check(x, t0, pos, u)
    n, hw, c = x.shape
    heads = u.shape[1]
    t0, pos, u = t0.contiguous(), pos.contiguous(), u.contiguous()
    z = torch.empty((n, heads, c), device=x.device, dtype=x.dtype)
    lse = torch.empty((n, heads), device=x.device, dtype=torch.float32)
    cfg = {**block_config(x.dtype, hw, heads, "fwd"), "INPUT_PRECISION": _input_precision(x.dtype)}
    _launch(
        _attention_pool_fwd_kernel, (n, triton.cdiv(heads, cfg["BLOCK_H"])), cfg,
        x, t0, pos, u, z, lse, hw, c, heads, x.stride(0), x.stride(1), x.stride(2),
    )
    return z, lse


def attention_pool_backward(
    x: torch.Tensor, t0: torch.Tensor, pos: torch.Tensor, u: torch.Tensor, lse: torch.Tensor, dz: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dT (N, HW+1, C), dU (N, H, C)), both fp32, of Z = attention_pool_forward(...).

    Two launches: P and dS per (image, head block), then dT and dU per (image, C block).
    """
    _check(x, t0, pos, u)
    n, hw, c = x.shape
    heads = u.shape[1]
    t0, pos, u, dz = t0.contiguous(), pos.contiguous(), u.contiguous(), dz.to(x.dtype).contiguous()
    probs = torch.empty((n, hw + 1, heads), device=x.device, dtype=x.dtype)
    dscores = torch.empty_like(probs)
    dtok = torch.empty((n, hw + 1, c), device=x.device, dtype=torch.float32)
    du = torch.empty((n, heads, c), device=x.device, dtype=torch.float32)
    strides = (x.stride(0), x.stride(1), x.stride(2))
    cfg = {**block_config(x.dtype, hw, heads, "bwd_scores"), "INPUT_PRECISION": _input_precision(x.dtype)}
    _launch(
        _attention_pool_bwd_scores_kernel, (n, triton.cdiv(heads, cfg["BLOCK_H"])), cfg,
        x, t0, pos, u, lse, dz, probs, dscores, hw, c, heads, *strides,
    )
    cfg = {**block_config(x.dtype, hw, heads, "bwd_tokens"), "INPUT_PRECISION": _input_precision(x.dtype)}
    _launch(
        _attention_pool_bwd_tokens_kernel, (n, triton.cdiv(c, cfg["BLOCK_C"])), cfg,
        x, t0, pos, u, dz, probs, dscores, dtok, du, hw, c, heads, *strides,
    )
    return dtok, du
