"""clip_fast.optim.AdamW and stochastic_round in torch ops: the same bit-level algorithm as
csrc/adamw_sr.h (its executable specification) and the Triton kernels of
clip_fast.kernels.adamw, on any device. It runs for CLIP_FAST_BACKEND=torch and without
the C++ extension, and is the reference the tests hold the other two to, bit for bit.

Integer work is done in int64 holding uint32 values, so no operation overflows.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def _mulhilo(a: torch.Tensor, mult: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * mult for uint32 a (int64 tensor) and uint32 mult."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_part = a_lo * mult  # < 2^48
    hi_part = a_hi * mult  # < 2^48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _M32
    return hi, lo


def philox4x32_10(key: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters (c, 0, 0, 0) (int64 tensor, c >= 0): four int64 tensors of uint32."""
    key &= _M64
    k0, k1 = key & _M32, key >> 32
    c0, c1 = counter & _M32, counter >> 32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for _ in range(10):
        hi_a, lo_a = _mulhilo(c0, 0xD2511F53)
        hi_b, lo_b = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def random_words(key: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The random words (a, b) of elements 0..numel-1 of a stream: int32 (numel, 2).

    Element e uses Philox block e >> 1: (w0, w1) when e is even, (w2, w3) when odd.
    """
    counter = torch.arange((numel + 1) // 2, device=device, dtype=torch.int64)
    w0, w1, w2, w3 = philox4x32_10(key, counter)
    a = torch.stack((w0, w2), dim=1).reshape(-1)[:numel]
    b = torch.stack((w1, w3), dim=1).reshape(-1)[:numel]
    words = torch.stack((a, b), dim=1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # uint32 -> int32 bit pattern


def _as_uint32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & _M32


def _uint16_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (t - ((t >> 15) << 16)).to(torch.int16).view(dtype)


def _round_bf16(x: torch.Tensor, r16: torch.Tensor | None) -> torch.Tensor:
    """fp32 -> bf16: stochastic with 16-bit randoms r16 (int64), nearest-even when None."""
    u = _as_uint32(x)
    mag = u & 0x7FFFFFFF
    if r16 is None:
        t = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    else:
        t = (u + r16) >> 16
        t = t - ((mag < 0x7F800000) & ((t & 0x7FFF) == 0x7F80)).to(torch.int64)
    t = torch.where(mag > 0x7F800000, (u >> 16) | 0x0040, t)
    return _uint16_to(t, torch.bfloat16)


def _round_fp16(x: torch.Tensor, r16: torch.Tensor | None) -> torch.Tensor:
    """fp32 -> fp16: stochastic with r16 (int64), nearest-even when None (see adamw_sr.h)."""
    stochastic = r16 is not None
    u = _as_uint32(x)
    sign = (u >> 16) & 0x8000
    mag = u & 0x7FFFFFFF
    r16 = r16 if stochastic else torch.zeros_like(u)
    add = (r16 >> 3) if stochastic else 0xFFF + ((mag >> 13) & 1)
    normal = (((mag + add) & ~0x1FFF) >> 13) - (112 << 10)
    is_sub = mag < 0x38800000
    ax = torch.where(is_sub, mag, 0).to(torch.int32).view(torch.float32)
    y = ax * 16777216.0
    if stochastic:
        k = y.trunc()
        sub = k.to(torch.int64) + (r16.to(torch.float32) < (y - k) * 65536.0).to(torch.int64)
    else:
        sub = ((y + 12582912.0) - 12582912.0).to(torch.int64)
    out = torch.where(is_sub, sub, normal)
    overflow_at = 0x477FE000 if stochastic else 0x477FF000
    saturated = 0x7BFF if stochastic else 0x7C00
    out = torch.where(mag >= overflow_at, torch.where(mag == 0x7F800000, 0x7C00, saturated), out)
    out = torch.where(mag > 0x7F800000, 0x7E00, out)
    return _uint16_to(sign | out, torch.float16)


def round_to(x: torch.Tensor, dtype: torch.dtype, r16: torch.Tensor | None) -> torch.Tensor:
    """fp32 `x` stored as `dtype` (stochastic when r16 is given, else nearest-even)."""
    if dtype == torch.float32:
        return x
    if dtype == torch.bfloat16:
        return _round_bf16(x, r16)
    return _round_fp16(x, r16)


def torch_stochastic_round(x: torch.Tensor, key: int = 0, rand: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch SR cast fp32 -> bf16; `rand`: int32 per element (low 16 bits used), else Philox(key)."""
    if rand is None:
        rand = random_words(key, x.numel(), x.device)[:, 0]
    r16 = rand.reshape(-1).to(torch.int64) & 0xFFFF
    return _round_bf16(x.reshape(-1), r16).reshape(x.shape)


def torch_adamw_update(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    r: torch.Tensor,
    words: torch.Tensor | None,
    hyper: "clip_fast.optim.Hyper",
    ts: "clip_fast.optim.TensorScalars",
    stochastic: bool,
) -> tuple[int, float]:
    """One tensor's update in place, torch ops only. Returns (non-finite count, max new sqrt(v)).

    `words`: int32 (numel, 2) random words (a, b), required when `stochastic`.
    """
    pf, gf = p.reshape(-1).float(), g.reshape(-1).float()
    mf, rf = m.reshape(-1).float(), r.reshape(-1).float()
    fp16_state = m.dtype == torch.float16
    if fp16_state:
        mf = mf * ts.decode_scale
        rf = rf * ts.decode_scale
    finite = (_as_uint32(gf) & 0x7FFFFFFF) < 0x7F800000
    m1 = hyper.beta1 * mf + hyper.one_minus_beta1 * gf
    v1 = hyper.beta2 * (rf * rf) + hyper.one_minus_beta2 * (gf * gf)
    # torch's CPU sqrt is not always correctly rounded (SLEEF); sqrt in fp64 rounded to
    # fp32 is (53 >= 2 * 24 + 2 bits: the double rounding is innocuous).
    r1 = torch.sqrt(v1.double()).float()
    denom = r1 * ts.inv_sqrt_bc2 + hyper.eps
    p1 = pf * hyper.decay - ts.step_size * (m1 / denom)
    p2, m2, r2 = torch.where(finite, p1, pf), torch.where(finite, m1, mf), torch.where(finite, r1, rf)
    amax = float(r2.max()) if fp16_state and r2.numel() else 0.0
    if fp16_state:
        m2 = m2 * ts.encode_scale
        r2 = r2 * ts.encode_scale
    if stochastic:
        a = words[:, 0].to(torch.int64) & _M32
        b = words[:, 1].to(torch.int64) & _M32
        rp, rm, rr = a & 0xFFFF, a >> 16, b & 0xFFFF
    else:
        rp = rm = rr = None
    p.view(-1).copy_(round_to(p2, p.dtype, rp if p.dtype == torch.bfloat16 else None))
    m.view(-1).copy_(round_to(m2, m.dtype, rm))
    r.view(-1).copy_(round_to(r2, r.dtype, rr))
    return int((~finite).sum()), amax
