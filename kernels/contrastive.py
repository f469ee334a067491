"""Blockwise contrastive (InfoNCE) statistics and gradients without storing S.

For image features A (M, D), text features B (N, D), logit scale s and bias b, the
logits are S = s * A @ B.T + b. Nothing of size M x N is ever written to memory:

- `lse_forward` makes ONE pass over S and returns both directions' log-sum-exp:
  row_lse[i] = logsumexp_j S[i, j] (online, per program) and col_lse[j] =
  logsumexp_i S[i, j], kept as per-program partials (P, N) and merged by a small
  reduction, so no program ever waits on another.
- Both grids are (row blocks, column splits): with M << N (the sharded loss, M = local
  batch, N = global batch) the row blocks alone would occupy a few of 100+ SMs, so the
  columns are split too (`column_splits`, from M, N and the SM count) and the per-split
  row partials are merged by logsumexp (forward) or summed (grad_a slices).
- `grad_backward` recomputes S tile by tile and contracts
  G[i, j] = exp(S[i, j] - row_lse[i]) + exp(S[i, j] - col_lse[j]) - 2 * [j == i + diag_offset]
  with both feature matrices: grad_a = G @ B and grad_b = G.T @ A. The program that
  owns a row block (and a column split) owns those rows of its split's slice of grad_a
  (plain read-modify-write, no atomics; the slices are summed after the launch);
  grad_b gets fp32 atomics. Deterministic mode runs the kernel twice with the roles of
  A and B swapped (P is symmetric in them) and no atomics. Split mode contracts the two
  softmaxes separately (grad_a = (P_row - E) @ B, grad_b = (P_col - E).T @ A) from the
  same tile of S: open_clip's local loss without gathered gradients needs exactly that.

- `grad_backward` with strips (bf16/fp16, the CUDA default for large S): a kernel
  writes G for a strip of rows to a bounded workspace and cuBLAS does the two products
  (see `_grad_backward_strips` for why).

Passes over S (one pass = 2*M*N*D FLOPs): forward 1, backward 3 (S, P@B, P.T@A), so 4
in all; 5 in deterministic mode with the fused backward. The label term is subtracted in fp32 inside the kernel,
before G is rounded to the input dtype: when the model is confident P[i, i] is close to 2
and the gradient is the small difference, which a bf16 copy of P would lose. The 1/(2B)
normaliser and the logit-scale gradient are O(B*D) and live with the caller
(clip_fast/loss.py).

Numerics: A and B feed tl.dot in their own dtype (bf16/fp16 on tensor cores, fp32 as
3xTF32) with fp32 accumulation. All softmax math is fp32 in base 2 (exp2/log2 are the
native MUFU instructions) with running maxima: the logit scale reaches 100, and an
unnormalised feature can push S far beyond exp's fp32 range (~88.7).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from clip_fast.kernels.common import dot, on_device

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _dot_tile(
    a_ptr, b_ptr, row_start, col_start, M, N, D, stride_am, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):
    """The raw dot products A[rows] @ B[cols].T of the tile at (row_start, col_start),
    fp32 (BLOCK_M, BLOCK_N)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # 64-bit block base pointers (row * stride passes 2^31 elements at N * D >= 2^31,
    # e.g. N = 1.7M at D = 1280, where a 32-bit product would wrap silently), 32-bit
    # offsets inside the tile: int64 offset tensors would cost registers and spill.
    a_blk = a_ptr + (row_start + tl.zeros((), tl.int64)) * stride_am
    b_blk = b_ptr + (col_start + tl.zeros((), tl.int64)) * stride_bn
    a_mask = (row_start + offs_m)[:, None] < M
    b_mask = (col_start + offs_n)[:, None] < N
    dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        k_mask = (k + offs_k) < D
        # Masked rows/columns/features load as zero: their dot products are 0 and
        # the callers mask them out of every statistic.
        a = tl.load(a_blk + offs_m[:, None] * stride_am + (k + offs_k)[None, :], mask=a_mask & k_mask[None, :], other=0.0)
        b = tl.load(b_blk + offs_n[:, None] * stride_bn + (k + offs_k)[None, :], mask=b_mask & k_mask[None, :], other=0.0)
        dots = dot(a, tl.trans(b), dots, INPUT_PRECISION, WIDEN)
    return dots


@triton.jit
def _logit_affine_log2(scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """(scale, bias) * log2(e), read on device (no host sync): S * log2(e) = dots *
    scale_log2e + bias_log2e feeds exp2/log2, the native MUFU instructions."""
    scale_log2e = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    bias_log2e = 0.0
    if HAS_BIAS:
        bias_log2e = tl.load(bias_ptr).to(tl.float32) * 1.4426950408889634
    return scale_log2e, bias_log2e


@triton.jit
def _lse_forward_kernel(
    a_ptr,          # (M, D) image features, unit stride along D
    b_ptr,          # (N, D) text features, unit stride along D
    row_part_ptr,   # (splits, M) fp32 out: natural-log row logsumexp over each column split
    col_part_ptr,   # (P, N) fp32 in/out: base-2 column logsumexp over this program's rows; -inf on entry
    scale_ptr,      # (1,) logit scale, already exponentiated (read on device: no host sync)
    bias_ptr,       # (1,) logit bias, read only when HAS_BIAS
    M, N, D,
    stride_am, stride_bn,  # row strides of A and B
    cols_per_split,  # columns of one split (grid axis 1), a multiple of BLOCK_N
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,  # interpreter only: widen bf16 dot operands (see common.dot)
):
    """Grid (P row programs, column splits): program (p, c) covers columns
    [c * cols_per_split, (c + 1) * cols_per_split) of the row blocks p, p + P, ...; its
    row statistics are one split's partial logsumexp (merged by the launcher), and its
    column statistics go to row p of the column partials, disjoint from other splits."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_programs = tl.num_programs(0)
    scale_log2e, bias_log2e = _logit_affine_log2(scale_ptr, bias_ptr, HAS_BIAS)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    col_part_row = col_part_ptr + pid.to(tl.int64) * N
    row_part = row_part_ptr + split.to(tl.int64) * M
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, N)
    # Grid-stride over row blocks: the launcher caps the grid at a few waves of SMs, so
    # the (P, N) column partials stay O(#SMs * N) however large M grows.
    for row_start in range(pid * BLOCK_M, M, num_programs * BLOCK_M):
        rows = row_start + offs_m
        row_valid = rows < M
        row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        for col_start in range(col_begin, col_end, BLOCK_N):
            cols = col_start + offs_n
            col_valid = cols < N  # splits end on tile boundaries: only N cuts a tile
            dots = _dot_tile(
                a_ptr, b_ptr, row_start, col_start, M, N, D, stride_am, stride_bn,
                BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, WIDEN,
            )
            s2 = dots * scale_log2e + bias_log2e  # S * log2(e)
            # Row statistics, online. Each tile has >= 1 valid column, so new_max is
            # finite for finite inputs; a NaN anywhere in S reaches row_sum through
            # exp2 (the maximum itself may drop NaNs on GPU), making the loss NaN.
            s2_rows = tl.where(col_valid[None, :], s2, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s2_rows, axis=1))
            row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s2_rows - new_max[:, None]), axis=1)
            row_max = new_max
            # Column statistics of this tile, folded into this program's partial.
            s2_cols = tl.where(row_valid[:, None], s2, float("-inf"))
            tile_col_max = tl.max(s2_cols, axis=0)
            tile_col_lse = tile_col_max + tl.log2(tl.sum(tl.exp2(s2_cols - tile_col_max[None, :]), axis=0))
            old = tl.load(col_part_row + cols, mask=col_valid, other=float("-inf"))
            top = tl.maximum(old, tile_col_lse)
            merged = top + tl.log2(tl.exp2(old - top) + tl.exp2(tile_col_lse - top))
            tl.store(col_part_row + cols, merged, mask=col_valid)
        row_lse = (row_max + tl.log2(row_sum)) * 0.6931471805599453
        tl.store(row_part + rows, row_lse, mask=row_valid)


@triton.jit
def _grad_tile(s2, row_lse2, col_lse2, rows, cols, in_bounds, diag_offset, SPLIT: tl.constexpr):
    """fp32 G of one tile from S * log2(e), zero outside the problem: (G, G) with
    G = P_row + P_col - 2E, or (G_row, G_col) = (P_row - E, P_col - E) when SPLIT. The
    label term is subtracted here, in fp32, before any rounding: when the model is
    confident P[i, i] is close to 1 and the gradient is the small difference."""
    is_label = cols[None, :] == rows[:, None] + diag_offset
    if SPLIT:
        g = tl.exp2(s2 - row_lse2[:, None])
        g = tl.where(in_bounds, tl.where(is_label, g - 1.0, g), 0.0)
        g_col = tl.exp2(s2 - col_lse2[None, :])
        g_col = tl.where(in_bounds, tl.where(is_label, g_col - 1.0, g_col), 0.0)
    else:
        g = tl.exp2(s2 - row_lse2[:, None]) + tl.exp2(s2 - col_lse2[None, :])
        g = tl.where(in_bounds, tl.where(is_label, g - 2.0, g), 0.0)
        g_col = g
    return g, g_col


@triton.jit
def _grad_backward_kernel(
    a_ptr,          # (M, D) features whose rows this program owns
    b_ptr,          # (N, D) the other side's features
    row_lse_ptr,    # (M,) fp32 natural-log row logsumexp of S
    col_lse_ptr,    # (N,) fp32 natural-log column logsumexp of S
    grad_a_ptr,     # (splits, M, D) fp32 out, zero on entry: p_scale * G @ B over each split's columns
    grad_b_ptr,     # (N, D) fp32 out, zero on entry: p_scale * G.T @ A (atomics; only if COMPUTE_GRAD_B)
    g_dot_ptr,      # (row blocks * splits,) fp32 out: this program's sum of G[i, j] * (A[i] . B[j]) (G_row when SPLIT)
    scale_ptr,      # (1,) logit scale
    bias_ptr,       # (1,) logit bias, read only when HAS_BIAS
    p_scale,        # power of two applied to G before its cast to the input dtype (fp16 range)
    diag_offset,    # the label of row i is column i + diag_offset
    M, N, D,
    stride_am, stride_bn,
    cols_per_split,  # columns of one split (grid axis 1), a multiple of BLOCK_N
    HAS_BIAS: tl.constexpr,
    COMPUTE_GRAD_B: tl.constexpr,
    SPLIT: tl.constexpr,  # grad_a from G_row = P_row - E, grad_b from G_col = P_col - E (not one G)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # feature chunk of the two gradient products
    INPUT_PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,  # interpreter only: widen bf16 dot operands (see common.dot)
):
    """Grid (row blocks, column splits): program (r, c) contracts the tiles of row block
    r in columns [c * cols_per_split, (c + 1) * cols_per_split) and owns its rows of
    grad_a's slice c (read-modify-write, no atomics; the launcher sums the slices in a
    fixed order). An atomic grad_a shared by the splits would need a second fp32 tile
    live for the products, which spills at BLOCK_K = 64 on sm_80."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    scale_log2e, bias_log2e = _logit_affine_log2(scale_ptr, bias_ptr, HAS_BIAS)
    row_start = pid * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = row_start + offs_m
    row_valid = rows < M
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_lse2 = tl.load(row_lse_ptr + rows, mask=row_valid, other=0.0) * 1.4426950408889634
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, N)
    # 64-bit block bases, 32-bit offsets inside the tile (see _dot_tile)
    a_blk = a_ptr + (row_start + tl.zeros((), tl.int64)) * stride_am
    grad_a_blk = grad_a_ptr + (split.to(tl.int64) * M + row_start) * D
    g_dot = tl.zeros((), tl.float32)
    for col_start in range(col_begin, col_end, BLOCK_N):
        cols = col_start + offs_n
        col_valid = cols < N  # splits end on tile boundaries: only N cuts a tile
        col_lse2 = tl.load(col_lse_ptr + cols, mask=col_valid, other=0.0) * 1.4426950408889634
        dots = _dot_tile(
            a_ptr, b_ptr, row_start, col_start, M, N, D, stride_am, stride_bn,
            BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, WIDEN,
        )
        s2 = dots * scale_log2e + bias_log2e
        in_bounds = row_valid[:, None] & col_valid[None, :]
        p, p_col = _grad_tile(s2, row_lse2, col_lse2, rows, cols, in_bounds, diag_offset, SPLIT)
        # The logit-scale gradient, sum G * dots, from fp32 G: a reduction of the
        # rounded copy below would carry bf16's 2^-9 error into d(logit_scale).
        g_dot += tl.sum(tl.sum(p * dots, axis=1), axis=0)
        # G is in [-2, 2] with entries ~1/N: p_scale (~N, capped at 2^14) keeps them in
        # fp16's normal range so the G@B products run on tensor cores in the input dtype.
        p_lo = (p * p_scale).to(a_ptr.dtype.element_ty)
        p_col_lo = (p_col * p_scale).to(a_ptr.dtype.element_ty) if SPLIT else p_lo
        b_blk = b_ptr + (col_start + tl.zeros((), tl.int64)) * stride_bn
        grad_b_blk = grad_b_ptr + (col_start + tl.zeros((), tl.int64)) * D
        for d_start in range(0, D, BLOCK_D):
            d = d_start + offs_d
            d_valid = d < D
            b_chunk = tl.load(
                b_blk + offs_n[:, None] * stride_bn + d[None, :],
                mask=col_valid[:, None] & d_valid[None, :], other=0.0,
            )
            ga_ptrs = grad_a_blk + offs_m[:, None] * D + d[None, :]
            ga_mask = row_valid[:, None] & d_valid[None, :]
            # Only this program touches these rows of this grad_a slice: no atomics.
            ga = tl.load(ga_ptrs, mask=ga_mask, other=0.0)
            ga = dot(p_lo, b_chunk, ga, INPUT_PRECISION, WIDEN)
            tl.store(ga_ptrs, ga, mask=ga_mask)
            if COMPUTE_GRAD_B:
                a_chunk = tl.load(a_blk + offs_m[:, None] * stride_am + d[None, :], mask=ga_mask, other=0.0)
                gb = dot(tl.trans(p_col_lo), a_chunk, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), INPUT_PRECISION, WIDEN)
                tl.atomic_add(
                    grad_b_blk + offs_n[:, None] * D + d[None, :], gb,
                    mask=col_valid[:, None] & d_valid[None, :], sem="relaxed",
                )
    tl.store(g_dot_ptr + pid * tl.num_programs(1) + split, g_dot)


@triton.jit
def _grad_strip_kernel(
    a_ptr,          # (M, D) features of the rows
    b_ptr,          # (N, D) features of the columns
    row_lse_ptr,    # (M,) fp32 natural-log row logsumexp of S
    col_lse_ptr,    # (N,) fp32 natural-log column logsumexp of S
    g_ptr,          # (R, N) out, input dtype: p_scale * G for rows row_start.. (G_row when SPLIT)
    g_col_ptr,      # (R, N) out, input dtype: p_scale * G_col (only when SPLIT)
    g_dot_ptr,      # (programs,) fp32 out: this tile's sum of G[i, j] * (A[i] . B[j]) (G_row when SPLIT)
    scale_ptr,      # (1,) logit scale
    bias_ptr,       # (1,) logit bias, read only when HAS_BIAS
    p_scale,        # power of two applied to G before its cast to the input dtype
    diag_offset,    # the label of row i is column i + diag_offset
    row_start,      # first row of S in this strip
    R, M, N, D,     # strip height, then the full problem
    stride_am, stride_bn,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,  # interpreter only: widen bf16 dot operands (see common.dot)
):
    """One (BLOCK_M x BLOCK_N) tile of G for a strip of rows, written to a workspace:
    the two products with the features are left to cuBLAS, whose GEMMs run near peak,
    instead of the fused kernel's per-tile read-modify-write of fp32 gradient rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    scale_log2e, bias_log2e = _logit_affine_log2(scale_ptr, bias_ptr, HAS_BIAS)
    local_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row_start + local_rows
    row_valid = (local_rows < R) & (rows < M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    in_bounds = row_valid[:, None] & col_valid[None, :]
    row_lse2 = tl.load(row_lse_ptr + rows, mask=row_valid, other=0.0) * 1.4426950408889634
    col_lse2 = tl.load(col_lse_ptr + cols, mask=col_valid, other=0.0) * 1.4426950408889634
    dots = _dot_tile(
        a_ptr, b_ptr, row_start + pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, D, stride_am, stride_bn,
        BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, WIDEN,
    )
    s2 = dots * scale_log2e + bias_log2e
    # the logit-scale reduction from fp32 G, before G is rounded (as in the fused kernel)
    g, g_col = _grad_tile(s2, row_lse2, col_lse2, rows, cols, in_bounds, diag_offset, SPLIT)
    tl.store(g_dot_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(g * dots, axis=1), axis=0))
    # int64 offsets: a strip may hold more than 2^31 entries at very large N
    offsets = local_rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(g_ptr + offsets, (g * p_scale).to(g_ptr.dtype.element_ty), mask=in_bounds)
    if SPLIT:
        tl.store(g_col_ptr + offsets, (g_col * p_scale).to(g_col_ptr.dtype.element_ty), mask=in_bounds)


# ----------------------------------------------------------------------------- configs


def _pow2_at_least(x: int, floor: int) -> int:
    return max(floor, 1 << (max(x, 1) - 1).bit_length())


def block_config(dtype: torch.dtype, dim: int, kind: str, aligned: bool) -> dict:
    """Tile sizes and launch parameters for `kind` in {"fwd", "bwd", "strip"}.

    Chosen with the AOT report (python -m clip_fast.aot): the largest tiles that
    compile for sm_80 and sm_90 with no stack frame (no spills). `aligned` calls (16-byte
    aligned features, D and row strides multiples of 16: every CLIP width) are
    specialised by Triton to vectorised loads with far fewer address registers, which
    leaves room for 128-wide tiles (two wgmma warpgroups on sm_90); other calls get
    smaller tiles. The backward keeps G, its low-precision copy and two gradient chunks
    live at once. fp32 runs as 3xTF32 with narrow K chunks. K and D chunks shrink for
    small feature dims (tl.dot needs K >= 16) so a tiny D does not pay for a padded pass.
    """
    wide = dtype in (torch.bfloat16, torch.float16)
    # unaligned fused kernels keep K chunks at 32: at 64 they spill on sm_80 (255 registers)
    widest_k = (64 if aligned or kind == "strip" else 32) if wide else 16
    block_k = min(widest_k, _pow2_at_least(dim, 16))
    if kind == "fwd":
        if wide:
            block_n = 128 if aligned else 64
            return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8, num_stages=3)
        block_m = 128 if aligned else 64
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, num_warps=8, num_stages=2)
    if kind == "strip":
        if not wide:
            raise ValueError("the strip backward takes bf16/fp16 features")
        # unaligned calls need more address registers: 64 x 64 tiles keep them spill-free
        tile = 128 if aligned else 64
        return dict(BLOCK_M=tile, BLOCK_N=tile, BLOCK_K=block_k, num_warps=8, num_stages=3)
    if kind == "bwd":
        if wide:
            block_d = min(32, _pow2_at_least(dim, 16))
            block_m = 128 if aligned else 64
            return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=8, num_stages=2)
        block_n = 64 if aligned else 32
        return dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=16, num_warps=8, num_stages=2)
    raise ValueError(f"kind must be 'fwd', 'bwd' or 'strip', got {kind!r}")


def is_aligned(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether Triton will specialise this call on 16-divisibility of the features'
    pointers, D and row strides (the variant compiled as `aligned` ahead of time)."""
    return all(v % 16 == 0 for v in (a.shape[1], a.stride(0), b.stride(0), a.data_ptr(), b.data_ptr()))


def strip_is_aligned(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`is_aligned` for the strip kernel, which also writes (R, N) workspace rows: N a
    multiple of 16 too. Exactly the hints clip_fast.aot_signatures compiles the aligned (128 x 128)
    strip variant with; any other call gets the small unaligned tiles."""
    return is_aligned(a, b) and b.shape[0] % 16 == 0


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 features: 3xTF32 keeps ~fp32 accuracy on tensor cores (plain TF32 would
    # not match the fp32 reference to 1e-5). bf16/fp16 ignore this setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _widen(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 3  # interpreter: small and odd, so that few row blocks already split the columns raggedly


def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * _sm_count(device)
    return 1 << 30  # interpreter: one program per row block


# Fewest column blocks one split covers on a GPU: each split costs the forward a row of
# (splits, M) partials and the backward an (M, D) fp32 slice of grad_a (zeroed, then
# summed), so a split must carry enough tiles of S to amortise them.
MIN_SPLIT_BLOCKS = 4


def column_splits(
    row_programs: int, N: int, block_n: int, device: torch.device, programs_per_sm: int
) -> tuple[int, int]:
    """(splits, columns per split) of a grid with `row_programs` programs along the rows.

    With M << N (the sharded loss: M = local batch, N = global batch) the row blocks
    alone are a few programs on 100+ SMs; the columns are then split so that
    row_programs * splits is about `programs_per_sm` per SM, each split still spanning at
    least MIN_SPLIT_BLOCKS column blocks (1 under the interpreter, whose small "SM
    count" makes small tests split too). Columns per split is a multiple of block_n and
    the last split takes the ragged remainder."""
    col_blocks = max(1, triton.cdiv(N, block_n))
    min_blocks = MIN_SPLIT_BLOCKS if device.type == "cuda" else 1
    want = triton.cdiv(programs_per_sm * _sm_count(device), max(1, row_programs))
    splits = max(1, min(want, col_blocks // min_blocks))
    blocks_per_split = triton.cdiv(col_blocks, splits)
    return triton.cdiv(col_blocks, blocks_per_split), blocks_per_split * block_n


def _check_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype not in _TL_DTYPE or b.dtype != a.dtype:
        raise ValueError(f"Triton contrastive kernels take fp32/bf16/fp16 features of one dtype, got {a.dtype} and {b.dtype}")
    if a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError("features must have unit stride along the feature dimension")


# ----------------------------------------------------------------------------- launchers


def lse_forward(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column logsumexp of S = scale * a @ b.T + bias in one pass.

    a: (M, D), b: (N, D), scale/bias: (1,) tensors on the same device.
    Returns row_lse (M,) and col_lse (N,), fp32, natural log. Row blocks x column
    splits programs (see `column_splits`); per-split row partials and per-program column
    partials are merged by logsumexp (max + sum of exponentials).
    """
    _check_operands(a, b)
    M, D = a.shape
    N = b.shape[0]
    cfg = block_config(a.dtype, D, "fwd", is_aligned(a, b))
    row_programs = min(triton.cdiv(M, cfg["BLOCK_M"]), _max_programs(a.device))
    splits, cols_per_split = column_splits(row_programs, N, cfg["BLOCK_N"], a.device, programs_per_sm=2)
    row_part = torch.empty((splits, M), device=a.device, dtype=torch.float32)
    col_part = torch.full((row_programs, N), float("-inf"), device=a.device, dtype=torch.float32)
    with on_device(a):
        _lse_forward_kernel[(row_programs, splits)](
            a, b, row_part, col_part, scale, bias if bias is not None else scale,
            M, N, D, a.stride(0), b.stride(0), cols_per_split,
            HAS_BIAS=bias is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            INPUT_PRECISION=_input_precision(a.dtype), WIDEN=_widen(a),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    row_lse = torch.logsumexp(row_part, dim=0) if splits > 1 else row_part[0]
    # Partials are base-2 logsumexps: convert to natural log before merging.
    col_lse = torch.logsumexp(col_part.mul_(LN2), dim=0) if row_programs > 1 else col_part[0].mul_(LN2)
    return row_lse, col_lse


def p_scale_for(n: int) -> float:
    """Power of two that brings softmax-sized entries (~1/n) of P near 1, capped so the
    largest possible entry (2 * p_scale) stays below fp16's maximum."""
    return float(min(1 << 14, 1 << (max(n, 1).bit_length() - 1)))


def grad_backward(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    diag_offset: int = 0,
    deterministic: bool = False,
    split: bool = False,
    strips: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G @ b, G.T @ a and sum(G * (a @ b.T)) for
    G = exp(S - row_lse[:, None]) + exp(S - col_lse[None, :]) - 2E, E[i, j] = [j == i + diag_offset].

    fp32 results of shapes (M, D), (N, D) and (). `deterministic=True` avoids atomics
    by a second launch with a and b swapped (one more pass over S). `split=True` uses
    the two softmaxes separately: G_row @ b, G_col.T @ a and sum(G_row * (a @ b.T)) with
    G_row = exp(S - row_lse[:, None]) - E and G_col = exp(S - col_lse[None, :]) - E,
    still from one pass over S.
    `strips` picks the strip backward (bf16/fp16 only; see `_grad_backward_strips`),
    which is deterministic too; None lets `prefer_strips` decide.
    """
    _check_operands(a, b)
    M, D = a.shape
    N = b.shape[0]
    if strips is None:
        strips = prefer_strips(a, M, N)
    if strips:
        if a.dtype == torch.float32:
            raise ValueError("the strip backward (strips=True, CLIP_FAST_CONTRASTIVE_BACKWARD=strips) needs bf16/fp16 features, got float32")
        if a.is_cuda and not mm_has_out_dtype():
            raise RuntimeError(f"the strip backward needs torch.mm(..., out_dtype=) (torch >= 2.8); this is torch {torch.__version__}")
        return _grad_backward_strips(a, b, scale, bias, row_lse, col_lse, diag_offset, split)
    cfg = block_config(a.dtype, D, "bwd", is_aligned(a, b))
    launch = dict(cfg=cfg, scale=scale, bias=bias, p_scale=p_scale_for(min(M, N)), split=split, deterministic=deterministic)
    grad_b = None if deterministic else torch.zeros(N, D, device=a.device, dtype=torch.float32)
    grad_a, g_dot = _fused_backward_pass(a, b, row_lse, col_lse, diag_offset, grad_b, **launch)
    if deterministic:
        grad_b, _ = _fused_backward_pass(b, a, col_lse, row_lse, -diag_offset, None, **launch)
    inv = 1.0 / launch["p_scale"]
    return grad_a.mul_(inv), grad_b.mul_(inv), g_dot.sum()


def _fused_backward_pass(
    a: torch.Tensor,
    b: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    diag_offset: int,
    grad_b: torch.Tensor | None,
    *,
    cfg: dict,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    p_scale: float,
    split: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of `_grad_backward_kernel` over a's rows: returns p_scale * G @ b
    (M, D) fp32 and the per-program sums of G * dots. `grad_b` (atomic mode) receives
    p_scale * G.T @ a by atomics; None in deterministic mode (the swapped launch
    computes it)."""
    M, D = a.shape
    N = b.shape[0]
    row_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    # one wave: every split holds an (M, D) fp32 slice of grad_a, ~#SMs * BLOCK_M * D in all
    splits, cols_per_split = column_splits(row_blocks, N, cfg["BLOCK_N"], a.device, programs_per_sm=1)
    grad_a = torch.zeros(splits, M, D, device=a.device, dtype=torch.float32)
    g_dot = torch.empty(row_blocks * splits, device=a.device, dtype=torch.float32)
    with on_device(a):
        _grad_backward_kernel[(row_blocks, splits)](
            a, b, row_lse, col_lse, grad_a, grad_a if grad_b is None else grad_b, g_dot, scale,
            bias if bias is not None else scale, p_scale, diag_offset,
            M, N, D, a.stride(0), b.stride(0), cols_per_split,
            HAS_BIAS=bias is not None, COMPUTE_GRAD_B=grad_b is not None, SPLIT=split,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
            INPUT_PRECISION=_input_precision(a.dtype), WIDEN=_widen(a),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return (grad_a[0] if splits == 1 else grad_a.sum(0)), g_dot


# The strip backward needs bf16/fp16 features and pays off once S is large enough for
# the fused kernel's traffic to dominate: 8k x 8k and up (a FLOP/byte estimate for
# H100/A100, not yet measured; benchmarks/test_loss.py times both on a GPU).
STRIP_MIN_ENTRIES = 1 << 26
# A workspace strip of G holds about STRIP_ENTRIES entries (256 MiB in bf16), and at
# least STRIP_MIN_ROWS rows so the G @ b GEMM keeps the whole GPU busy. Each strip but
# the first also adds an (N, D) fp32 product into grad_b (16 bytes per entry of
# traffic against 2 * R FLOPs per entry of its GEMM), so at large N strips grow to
# STRIP_TALL_ROWS rows as long as the workspace stays within STRIP_MAX_ENTRIES (2 GiB
# in bf16): 8x fewer accumulations at N = 256k than 512-row strips.
STRIP_ENTRIES = 1 << 27
STRIP_MIN_ROWS = 1024
STRIP_TALL_ROWS = 4096
STRIP_MAX_ENTRIES = 1 << 30


@functools.lru_cache(maxsize=None)
def mm_has_out_dtype() -> bool:
    """Whether this torch's mm takes out_dtype (bf16/fp16 operands, fp32 result: torch
    2.8+); the strip backward needs it for its cuBLAS products."""
    probe = torch.empty(1, 1, dtype=torch.bfloat16, device="meta")
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False
    return True


def prefer_strips(a: torch.Tensor, M: int, N: int) -> bool:
    """Whether `grad_backward` runs the strip backward by default for these operands."""
    return (
        a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and M * N >= STRIP_MIN_ENTRIES
        and mm_has_out_dtype()
    )


def strip_rows(M: int, N: int, block_m: int, planes: int = 1) -> int:
    """Rows of G per workspace strip (a multiple of block_m), for `planes` workspace
    planes (2 in split mode): max(STRIP_MIN_ROWS, STRIP_ENTRIES / N, and STRIP_TALL_ROWS
    while planes * rows * N <= STRIP_MAX_ENTRIES), at most M rounded up to the tile."""
    n = max(N, 1)
    tall = min(STRIP_TALL_ROWS, STRIP_MAX_ENTRIES // (planes * n))
    rows = min(M, max(STRIP_MIN_ROWS, STRIP_ENTRIES // (planes * n), tall))
    return triton.cdiv(max(rows, 1), block_m) * block_m


def _mm_fp32_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """out = x @ y with fp32 accumulation, written into fp32 `out` (no temporary the
    size of out); operands in their own dtype."""
    if x.is_cuda:
        torch.mm(x, y, out_dtype=torch.float32, out=out)  # cuBLAS: bf16/fp16 tensor cores, fp32 out
    else:  # CPU tensors (the interpreter): fp32 products of bf16/fp16 values are exact
        torch.mm(x.float(), y.float(), out=out)


def _grad_backward_strips(
    a: torch.Tensor, b: torch.Tensor,  # (M, D), (N, D) bf16/fp16 features
    scale: torch.Tensor, bias: torch.Tensor | None,  # 0-dim, as in grad_backward
    row_lse: torch.Tensor, col_lse: torch.Tensor,  # (M,), (N,) fp32
    diag_offset: int, split: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_backward by strips of rows: a Triton kernel recomputes S for R rows and writes
    p_scale * G in the input dtype to an (R, N) workspace; cuBLAS then computes
    G_strip @ b (those rows of grad_a, complete, written in place) and
    G_strip.T @ a[strip] (the first strip straight into grad_b, later ones into one
    reused (N, D) buffer added to grad_b: torch's mixed-dtype addmm takes no fp32
    accumulator for bf16/fp16 operands). Still 4 passes over S in all, no atomics
    (deterministic), and O(R * N + (M + N) * D) memory.

    Why: at D = 512+ the fused kernel cannot keep a row block's gradient (BLOCK_M x D
    fp32) in registers, so every tile reads and writes it, ~0.6 MB per 128 x 64 tile:
    ~80 GB of L2 traffic at 32k x 32k, more than the arithmetic takes. Here the extra
    traffic is the workspace (write once, read twice: 6 bytes per entry of S, ~6 GB at
    32k x 32k) plus one fp32 (N, D) addition per strip after the first."""
    M, D = a.shape
    N = b.shape[0]
    cfg = block_config(a.dtype, D, "strip", strip_is_aligned(a, b))
    p_scale = p_scale_for(min(M, N))
    rows = strip_rows(M, N, cfg["BLOCK_M"], planes=2 if split else 1)
    workspace = torch.empty((2 if split else 1, rows, N), device=a.device, dtype=a.dtype)  # (1|2, R, N)
    grad_a = torch.empty(M, D, device=a.device, dtype=torch.float32)
    # every strip writes grad_b (the first) or adds to it; zeros only when there is none
    grad_b = (torch.empty if M > 0 else torch.zeros)(N, D, device=a.device, dtype=torch.float32)
    contribution = torch.empty_like(grad_b) if M > rows else None
    g_dots = []
    for start in range(0, M, rows):
        r = min(rows, M - start)
        grid = (triton.cdiv(r, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
        g_dot = torch.empty(grid[0] * grid[1], device=a.device, dtype=torch.float32)
        with on_device(a):
            _grad_strip_kernel[grid](
                a, b, row_lse, col_lse, workspace[0], workspace[-1], g_dot, scale,
                bias if bias is not None else scale, p_scale, diag_offset,
                start, r, M, N, D, a.stride(0), b.stride(0),
                HAS_BIAS=bias is not None, SPLIT=split,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                INPUT_PRECISION=_input_precision(a.dtype), WIDEN=_widen(a),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
        g_row, g_col = workspace[0, :r], workspace[-1, :r]
        _mm_fp32_into(grad_a[start : start + r], g_row, b)
        if start == 0:
            _mm_fp32_into(grad_b, g_col.t(), a[:r])
        else:
            _mm_fp32_into(contribution, g_col.t(), a[start : start + r])
            grad_b.add_(contribution)
        g_dots.append(g_dot)
    inv = 1.0 / p_scale
    return grad_a.mul_(inv), grad_b.mul_(inv), torch.cat(g_dots).sum()
