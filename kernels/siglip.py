"""Fused SigLIP loss kernel: loss and all gradients in ONE pass over the logits.

For an (M, D) block of image features I and an (N, D) block of text features T:

    dots = I @ T.T                       # (M, N), never stored
    S    = scale * dots + bias
    z    = +1 on the diagonal (only when `has_pos`), -1 elsewhere
    loss = sum_ij softplus(-z_ij S_ij) * inv_n          (= -logsigmoid(z S) / B_local)
    G    = dloss/dS = -z * sigmoid(-z S) * inv_n
    dI   = scale * G @ T,  dT = scale * G.T @ I,  dscale = sum(G * dots),  dbias = sum(G)

SigLIP has no normaliser (no log-sum-exp over a row or a column), so G of a tile is
known as soon as the tile's dot products are: forward and backward fuse into a single
pass and the autograd backward only rescales the saved gradients by grad_output.
Per tile that is 3 matmuls (dots, G@T, G.T@I) instead of the 4 of "forward, then
backward recomputing S".

Why dI is not accumulated in registers: flash-attention keeps the (BLOCK_M, D) output
accumulator in registers, which works for D <= 256. CLIP embedding widths are 512-1280,
and a (64, 1280) fp32 accumulator is 320 KiB — more than a whole SM's register file.
So each (row block, column block) tile makes two sweeps over D in BLOCK_K chunks:

  sweep 1: dots += I[:, k] @ T[:, k].T             (the (BM, BN) fp32 tile stays in registers)
  sweep 2: dI[:, k] += G' @ T[:, k]    (fp32 atomic add, rows owned by this program
                                        unless the column range is split, see below)
           dT[:, k] += G'.T @ I[:, k]  (fp32 atomic add: many programs own these rows)

with G' = scale * G cast to the input dtype (bf16/fp16 operands on tensor cores with
fp32 accumulation, as flash-attention does with dS; cast as 2^15 * B_local * G and
rescaled after the product, so fp16 keeps small negative-pair entries normal). Cost of sweep 2 in memory
traffic: (BM + BN) * D fp32 atomic adds per tile against 6 * BM * BN * D FLOPs, i.e.
an arithmetic intensity of ~3*BM*BN / (2*(BM+BN)) FLOP/B = 24 FLOP/B for 64x64 tiles
(48 for 128x128). The atomics land in L2 (red.global.add, fire-and-forget, no load
latency on the critical path); the I/T chunks are re-read from L2 in sweep 2. fp32
atomics make the summation order of dI/dT run-dependent (last-bit differences only).

Grid: (row blocks, column splits). With few row blocks (small M: the rectangular b x B
blocks of the distributed loss) the column range is split over several programs so
the GPU stays busy; dI then also receives adds from several programs, which is why it
uses atomics too. Each program writes its partial (loss, dscale, dbias) to its own slot
of `partials`; the host sums them (deterministic, no scalar atomics).

NaN/inf: softplus(-x) is 0 at x = +inf, which would hide a non-finite input; adding
(S - S) (NaN for any non-finite S) to the loss sum makes the loss NaN instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from clip_fast.kernels.common import dot, on_device


@triton.jit
def _log1p(e):
    # log(1 + e) accurate for tiny e (Goldberg's trick; tl has no log1p the
    # interpreter also runs): u = 1 + e rounded; log(u) * e / (u - 1) cancels the
    # rounding error of u. Needed because -logsigmoid(x) = log1p(exp(-x)) for
    # confident negatives is ~1e-9 per pair, and B^2 of them add up.
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))


@triton.jit
def _row_tile(base, rows, row_ok, stride, cols, D):
    """Tile base[rows, cols] of a row-major matrix with D columns, zero outside it.

    base and stride are 16-byte aligned (the launcher's alignment contract, see
    siglip_fused_kernel), which the multiple_of hint passes on to the compiler.
    """
    return tl.load(tl.multiple_of(base + rows[:, None] * stride + cols[None, :], [16, 16]),
                   mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def siglip_fused_kernel(
    I, T,  # (M, D), (N, D) features; bf16 / fp16 / fp32, last dim contiguous
    params,  # (2,) fp32: [scale, bias]
    dI, dT,  # (M, D), (N, D) fp32 gradient accumulators (added to, not overwritten)
    partials,  # (grid_m * grid_n, 3) fp32: loss, dscale, dbias per program
    M, N, D,
    stride_i, stride_t, stride_di, stride_dt,  # row strides
    cols_per_prog,  # number of BLOCK_N column blocks one program visits
    has_pos,  # 1: the pair (i, i) is positive (own block), 0: all pairs negative
    inv_n,  # 1 / B_local
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" / "tf32x3" for fp32 operands, ignored for 16-bit
    UPCAST_DOT: tl.constexpr,  # interpreter only, see common.dot
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    scale = tl.load(params)
    bias = tl.load(params + 1)

    # 64-bit scalar base pointers per block, 32-bit offsets inside a tile: int64
    # pointer tensors of (BM, BK) cost twice the registers.
    # Alignment contract (enforced by the launcher, which pads otherwise): every base
    # pointer and every row stride is a multiple of 16 BYTES. The multiple_of hints
    # below tell the compiler so, which turns per-element predicated loads/atomics
    # into 16-byte vector accesses; without them (D = 7, say, unpadded) the kernel
    # needs 255 registers and spills on sm_80/sm_90.
    row0 = pid_m * BLOCK_M
    I_blk = I + row0.to(tl.int64) * stride_i
    dI_blk = dI + row0.to(tl.int64) * stride_di
    r = tl.arange(0, BLOCK_M)  # (BM,) rows within the block
    c = tl.arange(0, BLOCK_N)  # (BN,) columns within the block
    ks = tl.arange(0, BLOCK_K)  # (BK,)
    row_ok = (row0 + r) < M

    # per-row partial sums (reduced over columns each tile: a (BM, BN) accumulator
    # per statistic would cost 3 * BM * BN / (32 * num_warps) registers per thread)
    loss_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)

    col_block_start = pid_n * cols_per_prog
    col_block_end = tl.minimum(col_block_start + cols_per_prog, tl.cdiv(N, BLOCK_N))
    for cb in range(col_block_start, col_block_end):
        col0 = cb * BLOCK_N
        T_blk = T + col0.to(tl.int64) * stride_t
        dT_blk = dT + col0.to(tl.int64) * stride_dt
        col_ok = (col0 + c) < N

        # sweep 1 over D: dots tile (BM, BN) in fp32
        dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a = _row_tile(I_blk, r, row_ok, stride_i, k0 + ks, D)  # (BM, BK)
            b = _row_tile(T_blk, c, col_ok, stride_t, k0 + ks, D)  # (BN, BK)
            dots = dot(a, tl.trans(b), dots, INPUT_PRECISION, UPCAST_DOT)

        # loss and dloss/dS in fp32, numerically stable for any |S|
        S = scale * dots + bias
        valid = row_ok[:, None] & col_ok[None, :]
        pos = ((row0 + r)[:, None] == (col0 + c)[None, :]) & (has_pos != 0)
        z = tl.where(pos, 1.0, -1.0)
        x = z * S
        e = tl.exp(-tl.abs(x))  # in (0, 1]: never overflows
        softplus_neg_x = tl.maximum(-x, 0.0) + _log1p(e)  # -logsigmoid(x)
        sig_neg_x = tl.where(x >= 0, e, 1.0) / (1.0 + e)  # sigmoid(-x)
        g_unit = tl.where(valid, -z * sig_neg_x, 0.0)  # (BM, BN) B_local * dloss/dS, in [-1, 1]
        g = g_unit * inv_n  # dloss/dS
        loss_acc += tl.sum(tl.where(valid, softplus_neg_x + (S - S), 0.0), axis=1)
        ds_acc += tl.sum(g * dots, axis=1)
        db_acc += tl.sum(g, axis=1)

        # sweep 2 over D: dI += G' @ T, dT += G'.T @ I, G' = scale * G. The tensor cores
        # take G in the input dtype, scaled by 2^15 first: scale * G itself, ~4e-7 for
        # a typical negative pair at scale 10, bias -10, is subnormal in fp16 (below
        # 6.1e-5), where it keeps only a few bits. 2^15 * G_unit is in [-2^15, 2^15],
        # within fp16's range; the power of two is undone exactly on the fp32 products.
        gs = (g_unit * 32768.0).to(I.dtype.element_ty)
        g_back = scale * inv_n * (1.0 / 32768.0)
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + ks) < D
            a = _row_tile(I_blk, r, row_ok, stride_i, k0 + ks, D)  # (BM, BK)
            b = _row_tile(T_blk, c, col_ok, stride_t, k0 + ks, D)  # (BN, BK)
            d_a = dot(gs, b, None, INPUT_PRECISION, UPCAST_DOT) * g_back  # (BM, BK)
            tl.atomic_add(tl.multiple_of(dI_blk + r[:, None] * stride_di + (k0 + ks)[None, :], [16, 16]), d_a,
                          mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            d_b = dot(tl.trans(gs), a, None, INPUT_PRECISION, UPCAST_DOT) * g_back  # (BN, BK)
            tl.atomic_add(tl.multiple_of(dT_blk + c[:, None] * stride_dt + (k0 + ks)[None, :], [16, 16]), d_b,
                          mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")

    slot = partials + (pid_m * tl.num_programs(1) + pid_n) * 3
    tl.store(slot, tl.sum(loss_acc, axis=0) * inv_n)
    tl.store(slot + 1, tl.sum(ds_acc, axis=0))
    tl.store(slot + 2, tl.sum(db_acc, axis=0))


# Tile sizes per operand dtype, chosen with the sm_80/sm_90 compile report (registers
# and spills; `python -m clip_fast.aot --filter siglip`): 64x64 tiles, 8 warps. The fp32
# dots and G tiles take 16 registers/thread each; BLOCK_K=32 (16-bit) / 16 (fp32) keeps
# the staged operand chunks and the sweep-2 products small enough that nothing
# spills. fp32 operands use tf32x3 (three tf32 MMAs: ~fp32 accuracy on tensor cores;
# plain tf32 would give ~1e-3 relative error in S, far worse than an fp32 reference).
_CONFIGS = {
    torch.bfloat16: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2, precision="tf32"),
    torch.float16: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2, precision="tf32"),
    torch.float32: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2, precision="tf32x3"),
}


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few column splits so the split path is exercised


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its base pointer and row stride are 16-byte multiples (the
    kernel's alignment contract), else a copy with rows padded to 16 bytes."""
    item = x.element_size()
    if x.stride(1) == 1 and x.data_ptr() % 16 == 0 and (x.stride(0) * item) % 16 == 0:
        return x
    per16 = 16 // item
    padded = x.new_zeros((x.shape[0], triton.cdiv(x.shape[1], per16) * per16))
    padded[:, : x.shape[1]] = x
    return padded[:, : x.shape[1]]


def grad_buffer(rows: int, dim: int, device: torch.device) -> torch.Tensor:
    """A zeroed (rows, dim) fp32 accumulator satisfying the alignment contract."""
    return torch.zeros((rows, triton.cdiv(dim, 4) * 4), device=device, dtype=torch.float32)[:, :dim]


def siglip_block(
    image: torch.Tensor,  # (M, D)
    text: torch.Tensor,  # (N, D)
    params: torch.Tensor,  # (2,) fp32 [scale, bias]
    d_image: torch.Tensor,  # (M, D) fp32, accumulated into
    d_text: torch.Tensor,  # (N, D) fp32, accumulated into
    has_pos: bool,
    inv_n: float,
) -> torch.Tensor:
    """Launch the fused kernel on one (M x N) block; returns (3,) fp32 [loss, dscale, dbias]."""
    cfg = _CONFIGS[image.dtype]
    image, text = _aligned(image), _aligned(text)
    if _aligned(d_image) is not d_image or _aligned(d_text) is not d_text:
        raise ValueError("gradient accumulators must come from grad_buffer() (16-byte aligned rows)")
    M, D = image.shape
    N = text.shape[0]
    grid_m = triton.cdiv(M, cfg["BLOCK_M"])
    col_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    # enough programs for ~4 waves over the SMs, but never fewer than 4 column blocks
    # per program (the atomics on dI grow with the split)
    want = max(1, (4 * _num_sms(image.device)) // grid_m)
    split = max(1, min(want, col_blocks // 4 if col_blocks >= 8 else 1))
    cols_per_prog = triton.cdiv(col_blocks, split)
    grid_n = triton.cdiv(col_blocks, cols_per_prog)
    partials = torch.empty((grid_m * grid_n, 3), device=image.device, dtype=torch.float32)
    with on_device(image):
        siglip_fused_kernel[(grid_m, grid_n)](
            image, text, params, d_image, d_text, partials,
            M, N, D,
            image.stride(0), text.stride(0), d_image.stride(0), d_text.stride(0),
            cols_per_prog, int(has_pos), float(inv_n),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            INPUT_PRECISION=cfg["precision"],
            UPCAST_DOT=image.dtype == torch.bfloat16 and not image.is_cuda,  # CPU tensors = interpreter
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return partials.sum(0)
