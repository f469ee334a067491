"""AdamW with stochastically rounded bf16 weights and half-precision moments.

CLIP (Radford et al. 2021) trained with "half-precision Adam statistics and half-precision
stochastically rounded text encoder weights". This module makes that a drop-in optimizer:

    opt = clip_fast.optim.AdamW(clip_fast.optim.param_groups(model, weight_decay=0.2),
                                lr=5e-4, betas=(0.9, 0.98), eps=1e-6)

With bf16 parameters and the default bf16 moments each parameter costs 6 bytes (weight +
two moments) instead of 16 (fp32 master weight + fp32 moments; the bf16 model copy of
mixed precision comes on top of those 16). There is no fp32 master copy: every step
computes the update in fp32 and writes the weight back with stochastic rounding (SR),
so updates far below a bf16 spacing still move the weight on average. Round-to-nearest
would drop them: adding 1e-3 to 1.0 a thousand times stays at 1.0 in bf16.

Numerics (csrc/adamw_sr.h is the executable specification; the C++, Triton and torch
implementations agree bit for bit given the same random bits):

* SR cast fp32 -> bf16: add 16 uniform random bits to the low half of the fp32 bit
  pattern, truncate. Unbiased, sign-symmetric, exact values unchanged; NaN stays NaN,
  +-inf stays +-inf, and a finite value never becomes inf (|x| above the largest bf16
  saturates to +-3.3895e38: a weight must not turn into inf through rounding noise).
* The second moment is stored as r = sqrt(v) (`exp_avg_rms`), the first as m
  (`exp_avg`), both in `state_dtype` with SR. bf16 has fp32's exponent range, so bf16
  moments need nothing else. fp16 does not: v = g^2 underflows for |g| < 2.4e-4 and
  then m / (sqrt(v) + eps) explodes. Storing sqrt(v) halves the exponent range needed,
  and fp16 moments are in addition kept multiplied by a per-tensor power of two 2^e
  (`moment_exp`) chosen from the largest sqrt(v) of the previous step (`rms_amax`) so
  that it lands in [2^8, 2^9): 7 binades of headroom for growth, 22 before fp16's
  subnormals. The rescale happens inside the update (decode with the old exponent,
  encode with the new one; powers of two are exact). A value still beyond 65504 after
  a sudden >128x jump saturates at 65504 for one step instead of becoming inf.
* Random bits come from Philox4x32-10 keyed by (seed, parameter index, step): runs are
  reproducible, independent of the device's thread count, and the GPU (Triton), CPU
  (C++) and torch paths draw identical bits. The rule: element e of a tensor, counted in
  memory order (for a channels_last weight, its position in storage), takes the Philox
  block (w0, w1, w2, w3) of counter e >> 1 (the 128-bit counter (e >> 1, 0, 0, 0) as four
  32-bit words; key = the stream key as two 32-bit words, low first); even e uses
  (a, b) = (w0, w1), odd e (w2, w3); the weight rounds with a & 0xFFFF, the first moment
  with a >> 16, sqrt(v) with b & 0xFFFF (the SR cast alone: a & 0xFFFF).
* NaN/inf gradients: elements whose gradient is not finite are skipped (weight and both
  moments keep their values) and counted in `state["nonfinite_count"]`;
  `on_nonfinite="raise"` raises FloatingPointError after the step instead (the skipped
  elements are untouched, so the optimizer state stays valid either way). Finite
  gradients above ~1e19 overflow fp32's g*g like in any fp32 Adam.

Dispatch (clip_fast._backend.select_backend): CUDA tensors run one Triton kernel per
parameter group (and dtype combination) over all its tensors; CPU tensors run the C++
extension (clip_fast/_ext.py), or the pure-torch path (clip_fast/adamw_torch.py) when it
is unavailable (one-time warning) or CLIP_FAST_BACKEND=torch.
"""
from __future__ import annotations

import math
import struct
from typing import Any, Iterable

import torch
from torch import nn

from clip_fast._backend import ADAMW, STOCHASTIC_ROUND, select_backend
from clip_fast.adamw_torch import random_words, torch_adamw_update, torch_stochastic_round

__all__ = ["AdamW", "param_groups", "stochastic_round"]

STATE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PARAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Storage kinds shared with csrc/adamw_sr.h and kernels/adamw.py.
KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# fp16 moments: largest sqrt(v) of a tensor is kept in [2^TARGET_EXP, 2^(TARGET_EXP+1)).
TARGET_EXP = 8
EXP_LIMIT = 100

_M64 = 0xFFFFFFFFFFFFFFFF


# --------------------------------------------------------------------------------------
# Host-side scalars
# --------------------------------------------------------------------------------------
def f32(x: float) -> float:
    """x rounded to the nearest fp32 (every kernel receives its scalars already rounded)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _mix64(z: int) -> int:
    # splitmix64 finaliser: decorrelates seed, parameter index and step.
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def stream_key(seed: int, index: int = 0, step: int = 0) -> int:
    """64-bit Philox key of one tensor's random stream (as a signed int64)."""
    key = _mix64(_mix64(_mix64(seed & _M64) ^ index) ^ step)
    return key - (1 << 64) if key >= 1 << 63 else key


def next_moment_exp(e_old: int, rms_amax: float) -> int:
    """Exponent e of fp16 moments (stored value = true value * 2^e) for the next step."""
    if not (rms_amax > 0.0 and math.isfinite(rms_amax)):
        return e_old
    _, ex = math.frexp(rms_amax)  # rms_amax = mantissa * 2^ex, mantissa in [0.5, 1)
    return max(-EXP_LIMIT, min(EXP_LIMIT, TARGET_EXP - (ex - 1)))


# --------------------------------------------------------------------------------------
# Scalars of one step
# --------------------------------------------------------------------------------------
class Hyper:
    """Per-group fp32 scalars (already rounded to fp32)."""

    def __init__(self, beta1: float, beta2: float, lr: float, weight_decay: float, eps: float) -> None:
        self.beta1 = f32(beta1)
        self.one_minus_beta1 = f32(1.0 - beta1)
        self.beta2 = f32(beta2)
        self.one_minus_beta2 = f32(1.0 - beta2)
        self.decay = f32(1.0 - lr * weight_decay)
        self.eps = f32(eps)

    def args(self) -> tuple[float, ...]:
        return (self.beta1, self.one_minus_beta1, self.beta2, self.one_minus_beta2, self.decay, self.eps)


class TensorScalars:
    """Per-tensor fp32 scalars of one step."""

    def __init__(self, lr: float, beta1: float, beta2: float, step: int, e_old: int = 0, e_new: int = 0) -> None:
        self.step_size = f32(lr / (1.0 - beta1**step))
        self.inv_sqrt_bc2 = f32(1.0 / math.sqrt(1.0 - beta2**step))
        self.decode_scale = 2.0 ** (-e_old)
        self.encode_scale = 2.0**e_new


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def _new_seed() -> int:
    # Drawn from torch's default generator, so torch.manual_seed makes runs reproducible.
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def stochastic_round(x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """Cast a float32 tensor to bfloat16 with stochastic rounding.

    Each element rounds to one of its two neighbouring bf16 values, up with probability
    equal to its distance from the lower one (in bf16 spacings), so the result is an
    unbiased estimate of `x`. Values representable in bf16 are returned unchanged, NaN
    stays NaN, +-inf stays +-inf, and finite values never round to inf (magnitudes above
    the largest bf16, 3.3895e38, saturate to it).

    Args:
        x: float32 tensor on any device.
        seed: seeds the Philox stream (same seed, same result on every device and backend);
            None draws one from torch's default generator.
    Returns:
        bfloat16 tensor shaped like `x`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    key = stream_key(_new_seed() if seed is None else seed)
    src = x.contiguous()
    backend = select_backend(STOCHASTIC_ROUND, src)
    if backend == "triton":
        from clip_fast.kernels import adamw as kernels

        return kernels.stochastic_round(src, key)
    if backend == "cpp":
        return torch.ops.clip_fast.stochastic_round_bf16(src, key)
    return torch_stochastic_round(src, key)


# Substrings of parameter names that never get weight decay (CLIP / open_clip convention:
# gains and biases of norms, biases, embeddings and the temperature).
NO_DECAY_NAME_PARTS = (
    "bn",
    "ln",
    "norm",
    "bias",
    "logit_scale",
    "logit_bias",
    "positional_embedding",
    "token_embedding",
    "class_embedding",
    "embedding",
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """CLIP's two parameter groups for any nn.Module: decay on weight matrices only.

    Parameters with fewer than 2 dimensions, and parameters whose name contains one of
    NO_DECAY_NAME_PARTS (norm layers 'bn'/'ln'/'norm', 'bias', 'logit_scale',
    'logit_bias', 'positional_embedding', 'token_embedding', 'class_embedding', other
    embeddings), get weight_decay=0. Frozen parameters (requires_grad=False) are left out.
    Returns [{'params': decay, 'weight_decay': weight_decay},
    {'params': no_decay, 'weight_decay': 0.0}] (empty groups dropped).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.lower()
        exempt = p.ndim < 2 or any(part in parts for part in NO_DECAY_NAME_PARTS)
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _is_dense(t: torch.Tensor) -> bool:
    """The elements fill storage[offset : offset + numel] in some order (any permutation of
    dimensions: contiguous, channels_last, transposed)."""
    if t.numel() == 0 or t.is_contiguous():
        return True
    span = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != span:
            return False
        span *= size
    return True


def _layout_strides(p: torch.Tensor) -> tuple[int, ...]:
    """Strides of the optimizer state of p: p's own when dense, else contiguous."""
    return tuple(p.stride()) if _is_dense(p) else tuple(torch.empty(p.shape, device="meta").stride())


def _laid_out_like(t: torch.Tensor, p: torch.Tensor) -> bool:
    """t (dense) has the memory order of p's state (strides of size-1 dimensions aside)."""
    want = _layout_strides(p)
    return all(a == b for a, b, n in zip(t.stride(), want, t.shape) if n > 1)


def _memory_order(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """t's elements as a 1-D tensor in memory order: a view when t is dense (and laid out
    like `like`, when given), else a copy in the layout of `like` (or contiguous)."""
    target = t if like is None else like
    if _is_dense(t) and (like is None or _laid_out_like(t, like)):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    work = torch.empty_like(target, dtype=t.dtype, memory_format=torch.preserve_format)
    work.copy_(t)
    return work.as_strided((work.numel(),), (1,), work.storage_offset())


def _match_layout(state: dict[str, Any], p: torch.Tensor) -> None:
    """Puts the moments in p's layout (once, e.g. after loading contiguous state for a
    channels_last parameter): elements are paired by memory position."""
    for key in ("exp_avg", "exp_avg_rms"):
        moment = state[key]
        if not (_is_dense(moment) and _laid_out_like(moment, p)):
            relaid = torch.empty_like(p, dtype=moment.dtype, memory_format=torch.preserve_format)
            state[key] = relaid.copy_(moment)


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with SR bf16 weights and half-precision moments.

    Same arguments and update rule as torch.optim.AdamW (no amsgrad/maximize), plus:

    Args:
        stochastic_rounding: round bf16 weights and half-precision moments stochastically
            (default). False rounds to nearest even, which stalls once updates fall
            below half a bf16 spacing (the baseline SR fixes).
        state_dtype: dtype of both moments: torch.bfloat16, torch.float16 or
            torch.float32. None (default): bfloat16 for bf16 parameters, float32 for
            the others. fp16 moments are kept scaled by a per-tensor power of two
            (see the module docstring).
        seed: seed of the Philox streams (None: drawn from torch's default generator).
        on_nonfinite: "skip" (default) leaves elements with NaN/inf gradients untouched
            and counts them in state["nonfinite_count"]; "raise" also raises
            FloatingPointError after the step (needs a device sync).

    bf16 parameters are updated in place without an fp32 master copy; fp32 and fp16
    parameters get plain AdamW (computed in fp32, stored with nearest-even rounding).
    One fused kernel runs per parameter group and (device, dtype) combination.

    State per parameter: step, exp_avg (m), exp_avg_rms (sqrt of the second moment),
    nonfinite_count, and for fp16 moments moment_exp and rms_amax.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        stochastic_rounding: bool = True,
        state_dtype: torch.dtype | None = None,
        seed: int | None = None,
        on_nonfinite: str = "skip",
    ) -> None:
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.on_nonfinite = on_nonfinite
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            stochastic_rounding=bool(stochastic_rounding),
            state_dtype=state_dtype,
            seed=_new_seed() if seed is None else seed,
        )
        super().__init__(params, defaults)

    # ---- validation ------------------------------------------------------------------
    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        lr = group["lr"]
        lr_value = float(lr) if isinstance(lr, torch.Tensor) else lr
        if not isinstance(lr_value, (int, float)) or not lr_value >= 0.0:
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        eps = group["eps"]
        if not isinstance(eps, (int, float)) or not eps > 0.0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        wd = group["weight_decay"]
        if not isinstance(wd, (int, float)) or not wd >= 0.0:
            raise ValueError(f"weight_decay must be a number >= 0, got {wd!r}")
        if group["state_dtype"] is not None and group["state_dtype"] not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be None or one of {STATE_DTYPES}, got {group['state_dtype']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        plist = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in plist:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__}")
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError("AdamW does not support sparse parameters")
            if p.is_complex():
                raise ValueError("AdamW does not support complex parameters")
            if p.dtype not in PARAM_DTYPES:
                raise ValueError(f"parameters must be float32, bfloat16 or float16, got {p.dtype}")
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    # ---- state -------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim.Optimizer casts floating-point state to the parameter's dtype (and
        # integer state too); this optimizer keeps its own dtypes, so restore them.
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor):  # copies: never share a counter with the source
                    device = "cpu" if key == "step" else p.device
                    self.state[p][key] = value.detach().to(device=device, copy=True)

    def nonfinite_count(self) -> int:
        """Elements skipped so far because their gradient was NaN or inf (all parameters)."""
        return int(sum(int(s["nonfinite_count"]) for s in self.state.values() if "nonfinite_count" in s))

    def _init_state(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        sdtype = group["state_dtype"] or (torch.bfloat16 if p.dtype == torch.bfloat16 else torch.float32)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        # In p's memory layout (channels_last conv weights stay channels_last): the kernels
        # pair elements by memory position.
        state["exp_avg"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
        state["exp_avg_rms"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
        state["nonfinite_count"] = torch.zeros((), dtype=torch.int64, device=p.device)
        if sdtype == torch.float16:
            # First scale from this gradient: sqrt(v) after step 1 is sqrt(1 - beta2) * |g|.
            amax = grad.detach().abs().amax().float() if grad.numel() else torch.zeros((), device=p.device)
            state["rms_amax"] = (amax * math.sqrt(1.0 - group["betas"][1])).float()
            state["moment_exp"] = torch.zeros((), dtype=torch.int32, device=p.device)
        return state

    # ---- step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch.optim signature
        """Performs a single optimization step (closure: re-evaluates the model, returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skipped = []
        index = 0
        for group in self.param_groups:
            self._check_group(group)
            buckets: dict[tuple, list] = {}
            for p in group["params"]:
                i, index = index, index + 1
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state = self._init_state(p, grad, group)
                state["step"] += 1
                gdtype = grad.dtype if grad.dtype in (p.dtype, torch.float32) else torch.float32
                key = (p.device, p.dtype, gdtype, state["exp_avg"].dtype)
                buckets.setdefault(key, []).append((i, p, grad.to(gdtype), state))
            for (_, _, _, sdtype), items in buckets.items():
                skipped.append(self._update_bucket(group, items, sdtype))
        if self.on_nonfinite == "raise":
            total = sum(int(s) for s in skipped)
            if total:
                raise FloatingPointError(
                    f"{total} gradient elements were NaN or inf in this step; their parameters and "
                    "moments were left unchanged"
                )
        return loss

    def _update_bucket(self, group, items, sdtype) -> torch.Tensor | int:
        """Updates one (device, dtypes) bucket of a group; returns its non-finite count."""
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        hyper = Hyper(beta1, beta2, lr, group["weight_decay"], group["eps"])
        sr = group["stochastic_rounding"]
        seed = group["seed"]
        states = [s for _, _, _, s in items]
        for (_, p, _, _), state in zip(items, states):
            _match_layout(state, p)
        params = [_memory_order(p) for _, p, _, _ in items]
        grads = [_memory_order(g, like=p) for _, p, g, _ in items]
        flat = ("exp_avg", "exp_avg_rms")
        moments = [{**s, **{k: _memory_order(s[k]) for k in flat}} for s in states]  # same tensors, flat views
        steps = [int(s["step"].item()) for s in states]
        keys = [stream_key(seed, i, t) for (i, _, _, _), t in zip(items, steps)]
        backend = select_backend(ADAMW, *params)
        if backend == "triton":
            from clip_fast.kernels import adamw as kernels

            scalars = [TensorScalars(lr, beta1, beta2, t) for t in steps]
            count = kernels.adamw_step(params, grads, moments, keys, scalars, hyper, sr)
        else:
            e_old, e_new = _moment_exponents(states, sdtype)
            scalars = [TensorScalars(lr, beta1, beta2, t, eo, en) for t, eo, en in zip(steps, e_old, e_new)]
            update = _cpp_update if backend == "cpp" else _torch_update
            counts, maxima = update(params, grads, moments, keys, scalars, hyper, sr)
            count = _record_host_step(states, counts, maxima, e_new if sdtype == torch.float16 else None)
        for (_, p, _, _), work in zip(items, params):
            if not _is_dense(p):  # updated in a contiguous copy
                p.copy_(work.view(p.shape))
        return count


def _moment_exponents(states: list[dict[str, Any]], sdtype: torch.dtype) -> tuple[list[int], list[int]]:
    """(old, new) power-of-two exponents of each tensor's fp16 moments (0 for other
    state dtypes): the new one from the previous step's largest sqrt(v)."""
    if sdtype != torch.float16:
        return [0] * len(states), [0] * len(states)
    e_old = [int(s["moment_exp"]) for s in states]
    return e_old, [next_moment_exp(e, float(s["rms_amax"])) for e, s in zip(e_old, states)]


def _cpp_update(params, grads, moments, keys, scalars, hyper: Hyper, sr: bool):
    """One multi-tensor call of the C++ update (csrc/adamw_sr.cpp); (counts, maxima)."""
    return torch.ops.clip_fast.adamw_step(
        params,
        grads,
        [s["exp_avg"] for s in moments],
        [s["exp_avg_rms"] for s in moments],
        [],
        keys,
        [s.step_size for s in scalars],
        [s.inv_sqrt_bc2 for s in scalars],
        [s.decode_scale for s in scalars],
        [s.encode_scale for s in scalars],
        *hyper.args(),
        sr,
    )


def _torch_update(params, grads, moments, keys, scalars, hyper: Hyper, sr: bool):
    """The torch reference update, tensor by tensor (torch_adamw_update); (counts, maxima)."""
    counts, maxima = [], []
    for p, g, s, k, ts in zip(params, grads, moments, keys, scalars):
        words = random_words(k, p.numel(), p.device) if sr else None
        c, a = torch_adamw_update(p, g, s["exp_avg"], s["exp_avg_rms"], words, hyper, ts, sr)
        counts.append(c)
        maxima.append(a)
    return counts, maxima


def _record_host_step(states, counts, maxima, e_new: list[int] | None) -> int:
    """Adds the host update's non-finite counts to the states and, for fp16 moments
    (e_new given), stores their new exponent and largest sqrt(v); returns the count."""
    for i, (s, c) in enumerate(zip(states, counts)):
        s["nonfinite_count"] += c
        if e_new is not None:
            s["moment_exp"].fill_(e_new[i])
            s["rms_amax"].fill_(maxima[i])
    return sum(counts)
