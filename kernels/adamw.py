"""Triton kernels of clip_fast.optim.AdamW: one fused multi-tensor launch per parameter
group, and the stochastic-rounding cast on its own.

Multi-tensor launch: the host packs, per tensor, its data pointers, size, Philox key and
step scalars into one int64 table (`META_COLS` columns, one H2D copy per step) and cuts
every tensor into BLOCK-element blocks; program i reads its (tensor, block) pair from a
block table and casts the tensor's int64 addresses to typed pointers. So a group of ~200
CLIP tensors is one launch, however uneven their sizes, with no per-tensor Python loop
of launches.

Numerics follow csrc/adamw_sr.h exactly (the spec; bit-for-bit equal to the C++ and
torch paths given the same random bits): every rounding to 16 bits is integer work on
the fp32 bit pattern, sqrt and division are the correctly rounded sqrt_rn/div_rn, and the
launch disables FMA contraction (enable_fp_fusion=False). The kernel is memory bound
(~12-14 bytes per element for bf16 weights, grads and moments), so neither costs time.

Random bits: Philox4x32-10(counter = e >> 1, key), written out in `_philox4x32_10`, gives
(w0, w1, w2, w3) for the element pair (e, e+1); tl.interleave spreads them so element e gets (a, b) = (w0, w1) if e is even,
(w2, w3) if odd: one Philox evaluation per two elements, the stream of the C++ kernel.
"""
from __future__ import annotations

import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program (must be even: Philox pairs)
NUM_WARPS = 4
# Compile options of every launch below, also used by the AOT check (clip_fast.aot_signatures).
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, num_stages=3)
ADAMW_LAUNCH_OPTIONS = dict(LAUNCH_OPTIONS, enable_fp_fusion=False)  # no FMA contraction: bit-exact
META_COLS = tl.constexpr(9)  # p, g, m, r, rand, numel, key, step_size bits, inv_sqrt_bc2 bits
KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TARGET_EXP = tl.constexpr(8)  # same constants as clip_fast.optim
EXP_LIMIT = tl.constexpr(100)


PHILOX_MUL_A = tl.constexpr(0xD2511F53)  # Philox4x32-10 constants (csrc/adamw_sr.h)
PHILOX_MUL_B = tl.constexpr(0xCD9E8D57)
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox4x32_10(counter, key):
    """Philox4x32-10 blocks (w0, w1, w2, w3) of 64-bit counters (c, 0, 0, 0) under a 64-bit key.

    Written out instead of tl.randint4x: with an int64 counter Triton before 3.4 runs
    Philox4x64 there, so the bits (and the C++/torch agreement) would depend on the version.
    """
    counter = counter.to(tl.int64)
    key = key.to(tl.int64)  # a small key arrives as int32: sign-extend like the int64 key it is
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = c0 * 0
    c3 = c2
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, PHILOX_MUL_B) ^ c1 ^ k0
        c2 = tl.umulhi(a0, PHILOX_MUL_A) ^ c3 ^ k1
        c1 = a2 * PHILOX_MUL_B
        c3 = a0 * PHILOX_MUL_A
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def _decode(raw, KIND: tl.constexpr):
    """Stored element -> fp32 (exact). Half formats arrive as raw uint16 bits."""
    if KIND == 0:
        return raw
    elif KIND == 1:
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _bf16_bits(x, r16, STOCHASTIC: tl.constexpr):
    """fp32 -> bf16 bits (uint16): SR with 16 random bits r16, else nearest-even."""
    u = x.to(tl.uint32, bitcast=True)
    mag = u & 0x7FFFFFFF
    if STOCHASTIC:
        t = (u + r16) >> 16
        # A finite value never carries into the inf exponent: saturate to max bf16.
        t = t - ((mag < 0x7F800000) & ((t & 0x7FFF) == 0x7F80)).to(tl.uint32)
    else:
        t = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = tl.where(mag > 0x7F800000, (u >> 16) | 0x40, t)
    return out.to(tl.uint16)


@triton.jit
def _fp16_bits(x, r16, STOCHASTIC: tl.constexpr):
    """fp32 -> fp16 bits (uint16): SR (saturating at 65504) or nearest-even (IEEE)."""
    u = x.to(tl.uint32, bitcast=True)
    sign = (u >> 16) & 0x8000
    mag = u & 0x7FFFFFFF
    if STOCHASTIC:
        add = r16 >> 3
    else:
        add = 0xFFF + ((mag >> 13) & 1)
    normal = (((mag + add) & 0xFFFFE000) >> 13) - (112 << 10)
    is_sub = mag < 0x38800000
    y = tl.where(is_sub, mag, 0).to(tl.float32, bitcast=True) * 16777216.0  # |x| * 2^24, exact
    if STOCHASTIC:
        k = y.to(tl.uint32)
        sub = k + (r16.to(tl.float32) < (y - k.to(tl.float32)) * 65536.0).to(tl.uint32)
        overflow_at: tl.constexpr = 0x477FE000
        saturated = tl.where(mag == 0x7F800000, 0x7C00, 0x7BFF)
    else:
        sub = ((y + 12582912.0) - 12582912.0).to(tl.uint32)
        overflow_at: tl.constexpr = 0x477FF000
        saturated = tl.full(x.shape, 0x7C00, tl.uint32)
    out = tl.where(is_sub, sub, normal)
    out = tl.where(mag >= overflow_at, saturated.to(tl.uint32), out)
    out = tl.where(mag > 0x7F800000, 0x7E00, out)
    return (sign | out).to(tl.uint16)


@triton.jit
def _encode(x, r16, KIND: tl.constexpr, STOCHASTIC: tl.constexpr):
    if KIND == 0:
        return x
    elif KIND == 1:
        return _bf16_bits(x, r16, STOCHASTIC)
    else:
        return _fp16_bits(x, r16, STOCHASTIC)


@triton.jit
def _typed_ptr(address, KIND: tl.constexpr):
    if KIND == 0:
        return address.to(tl.pointer_type(tl.float32))
    else:
        return address.to(tl.pointer_type(tl.uint16))


@triton.jit
def _adamw_kernel(
    meta_ptr,  # (T, META_COLS) int64
    blocks_ptr,  # (n_blocks, 2) int32: tensor index, block index in the tensor
    exp_in_ptr,  # (T,) int32: exponent e of the stored fp16 moments
    amax_in_ptr,  # (T,) fp32: max sqrt(v) after the previous step
    exp_out_ptr,  # (T,) int32: exponent used for this step's stores
    amax_out_ptr,  # (T,) fp32, zeroed: max sqrt(v) after this step
    count_ptr,  # (T,) int32, zeroed: elements skipped for non-finite gradients
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    decay,
    eps,
    P_KIND: tl.constexpr,
    G_KIND: tl.constexpr,
    S_KIND: tl.constexpr,
    SR: tl.constexpr,
    EXPLICIT: tl.constexpr,  # random words from a tensor (tests) instead of Philox
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * pid).to(tl.int64)
    blk = tl.load(blocks_ptr + 2 * pid + 1).to(tl.int64)
    row = meta_ptr + t * META_COLS
    numel = tl.load(row + 5)
    step_size = tl.load(row + 7).to(tl.int32).to(tl.float32, bitcast=True)
    inv_sqrt_bc2 = tl.load(row + 8).to(tl.int32).to(tl.float32, bitcast=True)
    p_ptr = _typed_ptr(tl.load(row + 0), P_KIND)
    g_ptr = _typed_ptr(tl.load(row + 1), G_KIND)
    m_ptr = _typed_ptr(tl.load(row + 2), S_KIND)
    r_ptr = _typed_ptr(tl.load(row + 3), S_KIND)

    offs = blk * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) int64
    mask = offs < numel
    p = _decode(tl.load(p_ptr + offs, mask=mask, other=0), P_KIND)
    g = _decode(tl.load(g_ptr + offs, mask=mask, other=0), G_KIND)
    m = _decode(tl.load(m_ptr + offs, mask=mask, other=0), S_KIND)
    r = _decode(tl.load(r_ptr + offs, mask=mask, other=0), S_KIND)
    if S_KIND == 2:
        # fp16 moments are stored times 2^e; e for this step comes from last step's max.
        e_old = tl.load(exp_in_ptr + t)
        a_prev = tl.load(amax_in_ptr + t)
        biased = (a_prev.to(tl.int32, bitcast=True) >> 23) & 0xFF
        e_new = tl.minimum(tl.maximum(-(biased - (127 + TARGET_EXP)), -EXP_LIMIT), EXP_LIMIT)
        e_new = tl.where((a_prev > 0.0) & (biased < 255), e_new, e_old)
        m = m * ((127 - e_old) << 23).to(tl.float32, bitcast=True)
        r = r * ((127 - e_old) << 23).to(tl.float32, bitcast=True)

    finite = (g.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) < 0x7F800000
    m1 = beta1 * m + one_minus_beta1 * g
    v1 = beta2 * (r * r) + one_minus_beta2 * (g * g)
    r1 = tl.sqrt_rn(v1)
    denom = r1 * inv_sqrt_bc2 + eps
    p1 = p * decay - step_size * tl.div_rn(m1, denom)
    p = tl.where(finite, p1, p)
    m = tl.where(finite, m1, m)
    r = tl.where(finite, r1, r)

    if S_KIND == 2:
        tl.atomic_max(amax_out_ptr + t, tl.max(tl.where(mask, r, 0.0), axis=0))
        tl.store(exp_out_ptr + t, e_new)  # every program of tensor t writes the same value
        m = m * ((127 + e_new) << 23).to(tl.float32, bitcast=True)
        r = r * ((127 + e_new) << 23).to(tl.float32, bitcast=True)

    if SR:
        if EXPLICIT:
            rand_ptr = tl.load(row + 4).to(tl.pointer_type(tl.int32))
            wa = tl.load(rand_ptr + 2 * offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
            wb = tl.load(rand_ptr + 2 * offs + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
        else:
            key = tl.load(row + 6)
            pairs = blk * (BLOCK // 2) + tl.arange(0, BLOCK // 2)  # Philox counters e >> 1
            w0, w1, w2, w3 = _philox4x32_10(pairs, key)
            wa = tl.interleave(w0, w2)
            wb = tl.interleave(w1, w3)
        r_p = wa & 0xFFFF
        r_m = wa >> 16
        r_r = wb & 0xFFFF
    else:
        r_p = tl.zeros((BLOCK,), tl.uint32)
        r_m = r_p
        r_r = r_p
    P_SR: tl.constexpr = SR and P_KIND == 1  # SR for bf16 weights only
    tl.store(p_ptr + offs, _encode(p, r_p, P_KIND, P_SR), mask=mask)
    tl.store(m_ptr + offs, _encode(m, r_m, S_KIND, SR), mask=mask)
    tl.store(r_ptr + offs, _encode(r, r_r, S_KIND, SR), mask=mask)
    skipped = tl.sum((mask & (finite == 0)).to(tl.int32), axis=0)
    if skipped > 0:
        tl.atomic_add(count_ptr + t, skipped)


@triton.jit(do_not_specialize=["key", "numel"])  # one compiled kernel for every key and size
def _stochastic_round_kernel(
    x_ptr,  # (N,) fp32
    y_ptr,  # (N,) bf16 viewed as int16
    rand_ptr,  # (N,) int32 random words (EXPLICIT) or unused
    key,  # Philox key (int64)
    numel,
    EXPLICIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if EXPLICIT:
        wa = tl.load(rand_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    else:
        w0, w1, w2, w3 = _philox4x32_10(blk * (BLOCK // 2) + tl.arange(0, BLOCK // 2), key)
        wa = tl.interleave(w0, w2)
    y = _bf16_bits(x, wa & 0xFFFF, True)
    tl.store(y_ptr + offs, y.to(tl.int16, bitcast=True), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def _device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes t's GPU current for a launch: Triton takes device and stream from the current
    device, not from the tensors (cuda:1 tensors launched while cuda:0 is current would
    fault). A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


@functools.lru_cache(maxsize=64)
def _block_table(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(n_blocks, 2) int32 [tensor index, block index]; cached per set of tensor sizes."""
    rows = [(t, b) for t, n in enumerate(numels) for b in range(triton.cdiv(n, BLOCK))]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2).to(device)


class StepTables:
    """Device tables of one multi-tensor launch."""

    def __init__(self, params, grads, states, keys, scalars, rand=None) -> None:
        device = params[0].device
        rows = []
        for i, (p, g, s) in enumerate(zip(params, grads, states)):
            rows.append(
                [
                    p.data_ptr(),
                    g.data_ptr(),
                    s["exp_avg"].data_ptr(),
                    s["exp_avg_rms"].data_ptr(),
                    rand[i].data_ptr() if rand is not None else 0,
                    p.numel(),
                    keys[i],
                    _f32_bits(scalars[i].step_size),
                    _f32_bits(scalars[i].inv_sqrt_bc2),
                ]
            )
        meta = torch.tensor(rows, dtype=torch.int64)
        self.meta = meta.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else meta
        self.blocks = _block_table(tuple(p.numel() for p in params), device)
        self.counts = torch.zeros(len(params), dtype=torch.int32, device=device)
        self.fp16_state = states[0]["exp_avg"].dtype == torch.float16
        if self.fp16_state:
            self.exp_in = torch.stack([s["moment_exp"] for s in states])
            self.amax_in = torch.stack([s["rms_amax"] for s in states])
            self.exp_out = self.exp_in.clone()  # zero-size tensors have no program to write it
            self.amax_out = torch.zeros_like(self.amax_in)
        else:  # unused by the kernel; any valid pointers
            self.exp_in = self.exp_out = self.counts
            self.amax_in = self.amax_out = self.counts.view(torch.float32)

    def write_back(self, states) -> torch.Tensor:
        """Moves per-tensor outputs into the optimizer state; returns the skipped-element count."""
        if self.fp16_state:
            torch._foreach_copy_([s["moment_exp"] for s in states], list(self.exp_out.unbind()))
            torch._foreach_copy_([s["rms_amax"] for s in states], list(self.amax_out.unbind()))
        torch._foreach_add_([s["nonfinite_count"] for s in states], list(self.counts.to(torch.int64).unbind()))
        return self.counts.sum()


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    keys: list[int],
    scalars: list,
    hyper,
    stochastic: bool,
    rand: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One fused launch over same-dtype tensors of a group; updates `states` in place.

    scalars: per tensor, objects with step_size and inv_sqrt_bc2 (fp32-rounded floats).
    rand: optional int32 (numel, 2) random words per tensor (tests); else Philox(keys).
    Returns the number of elements skipped for non-finite gradients (0-dim device tensor).
    """
    tables = StepTables(params, grads, states, keys, scalars, rand)
    if tables.blocks.shape[0] > 0:
        with _device_of(params[0]):
            _adamw_kernel[(tables.blocks.shape[0],)](
                tables.meta,
                tables.blocks,
                tables.exp_in,
                tables.amax_in,
                tables.exp_out,
                tables.amax_out,
                tables.counts,
                *hyper.args(),
                P_KIND=KIND[params[0].dtype],
                G_KIND=KIND[grads[0].dtype],
                S_KIND=KIND[states[0]["exp_avg"].dtype],
                SR=bool(stochastic),
                EXPLICIT=rand is not None,
                BLOCK=BLOCK,
                **ADAMW_LAUNCH_OPTIONS,
            )
    return tables.write_back(states)


def stochastic_round(x: torch.Tensor, key: int, rand: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 -> bf16 with SR (contiguous x); rand: int32 per element (low 16 bits used)."""
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    n = x.numel()
    if n:
        with _device_of(x):
            _stochastic_round_kernel[(triton.cdiv(n, BLOCK),)](
                x,
                y.view(torch.int16),
                rand if rand is not None else x,
                key,
                n,
                EXPLICIT=rand is not None,
                BLOCK=BLOCK,
                **LAUNCH_OPTIONS,
            )
    return y
