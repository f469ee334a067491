"""The ahead-of-time compile configurations of every Triton kernel of clip_fast.kernels.

A configuration is one kernel with every argument typed (`signature`), its constexprs
fixed and its launch options: exactly what `triton.compile` needs to build the cubin a
launcher runs, without a GPU. The lists below enumerate, per kernel module, the
configurations its launchers can pick, through the launchers' own choice functions
(`contrastive.block_config`, `attention_pool.block_config`, `siglip._CONFIGS`,
`adamw.LAUNCH_OPTIONS`), so a change of tiles there is compiled here too.

This is development tooling: clip_fast.aot compiles and checks these (rung 4 of the
verification ladder, docs/verification.md); no runtime module imports it.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from clip_fast.kernels import adamw, attention_pool, contrastive, siglip

_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One compilable configuration of a Triton kernel."""

    name: str  # unique id, e.g. "contrastive_fwd[bf16,D=512]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # every argument -> "*bf16", "i32", "fp32", ... or "constexpr"
    constexprs: dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
    enable_fp_fusion: bool = True  # Triton's default; False where the launcher passes it
    uses_tensor_cores: bool = False  # True for kernels built around tl.dot
    # Arguments the compiler may assume divisible by 16 (pointers: 16-byte aligned). At
    # run time Triton specialises on exactly this for aligned tensors and integers that
    # are multiples of 16, so listing them compiles the variant a typical call runs.
    aligned: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- contrastive

# Arguments Triton specialises as divisible by 16 at run time. Always: fresh
# allocations (the workspace planes too: R * N entries apart, R a multiple of 64) and
# cols_per_split (a multiple of BLOCK_N). In aligned calls (`contrastive.is_aligned`;
# `strip_is_aligned` for the strip kernel) also the features, D and the row strides
# (and N for the strip kernel). M and N are left out elsewhere: batch sizes need not
# be multiples of 16, and the variant with fewer hints is the one with more register
# pressure.
_CONTRASTIVE_ALWAYS_ALIGNED = {
    "fwd": ("row_part_ptr", "col_part_ptr", "cols_per_split"),
    "bwd": ("grad_a_ptr", "grad_b_ptr", "cols_per_split"),
    "strip": ("g_ptr", "g_col_ptr"),
}
_CONTRASTIVE_ALIGNED_CALL = {
    "fwd": ("a_ptr", "b_ptr", "D", "stride_am", "stride_bn"),
    "bwd": ("a_ptr", "b_ptr", "D", "stride_am", "stride_bn"),
    "strip": ("a_ptr", "b_ptr", "D", "stride_am", "stride_bn", "N"),
}
CONTRASTIVE_KERNELS = {
    "fwd": contrastive._lse_forward_kernel,
    "bwd": contrastive._grad_backward_kernel,
    "strip": contrastive._grad_strip_kernel,
}
# feature pointers and the strip workspace are in the input dtype; every other pointer is fp32
_CONTRASTIVE_INPUT_DTYPE_ARGS = ("a_ptr", "b_ptr", "g_ptr", "g_col_ptr")
# feature widths covering every K/D chunk class of block_config (powers of two, tails)
CONTRASTIVE_DIMS = (1, 16, 17, 32, 33, 64, 65, 4096)


def _contrastive_signature(kind: str, tl_dtype: str) -> dict[str, str]:
    signature = {}
    for param in CONTRASTIVE_KERNELS[kind].params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = f"*{tl_dtype}" if param.name in _CONTRASTIVE_INPUT_DTYPE_ARGS else "*fp32"
        else:
            signature[param.name] = "fp32" if param.name == "p_scale" else "i32"
    return signature


def contrastive_modes(kind: str) -> list[dict]:
    """The constexpr modes a contrastive launcher can pass to `kind`'s kernel: the strip
    and fused backward take `split` as given, and the fused one computes grad_b by
    atomics unless deterministic."""
    if kind == "fwd":
        return [{}]
    if kind == "strip":
        return [dict(SPLIT=split) for split in (False, True)]
    return [dict(COMPUTE_GRAD_B=not det, SPLIT=split) for det in (False, True) for split in (False, True)]


def contrastive_config(kind: str, dtype: torch.dtype, cfg: dict, mode: dict, aligned: bool) -> KernelConfig:
    """The configuration of `kind`'s kernel for tiles `cfg` (`contrastive.block_config`),
    constexpr `mode` and a generic or 16-aligned call."""
    tl_dtype = _TL_DTYPE[dtype]
    tiles = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    label = ",".join(
        [tl_dtype] + [f"{k[6:]}={v}" for k, v in tiles.items()] + [f"{k}={int(v)}" for k, v in mode.items()]
        + (["aligned"] if aligned else [])
    )
    return KernelConfig(
        name=f"contrastive_{kind}[{label}]",
        fn=CONTRASTIVE_KERNELS[kind],
        signature=_contrastive_signature(kind, tl_dtype),
        constexprs=dict(HAS_BIAS=True, **mode, **tiles, INPUT_PRECISION=contrastive._input_precision(dtype),
                        WIDEN=False),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], uses_tensor_cores=True,
        aligned=_CONTRASTIVE_ALWAYS_ALIGNED[kind] + (_CONTRASTIVE_ALIGNED_CALL[kind] if aligned else ()),
    )


def contrastive_configs() -> list[KernelConfig]:
    """Every configuration the contrastive launchers can pick: kernel x dtype x
    `block_config` over every feature-width class x generic or 16-aligned call (the form
    a typical call, e.g. D = 512..1280, is specialised to at run time, with its larger
    tiles) x the launchers' modes."""
    configs: dict[str, KernelConfig] = {}
    for kind, dtype, dim, aligned in itertools.product(CONTRASTIVE_KERNELS, _TL_DTYPE, CONTRASTIVE_DIMS, (False, True)):
        if (aligned and dim % 16) or (kind == "strip" and dtype == torch.float32):
            continue
        cfg = contrastive.block_config(dtype, dim, kind, aligned)
        for mode in contrastive_modes(kind):
            config = contrastive_config(kind, dtype, cfg, mode, aligned)
            configs[config.name] = config
    return list(configs.values())


# ----------------------------------------------------------------------------- attention pool

# (hw, heads) of the feature maps the launchers meet: the tiny test/demo model (2x2, 2
# heads), RN50/RN101 (7x7, 32), RN50x4 (9x9, 40), RN50x16 (12x12, 48), RN50x64 (14x14, 64).
ATTENTION_POOL_SHAPES = {
    "tiny": (4, 2), "RN50": (49, 32), "RN50x4": (81, 40), "RN50x16": (144, 48), "RN50x64": (196, 64),
}
_ATTENTION_POOL_KERNELS = {
    "fwd": attention_pool._attention_pool_fwd_kernel,
    "bwd_scores": attention_pool._attention_pool_bwd_scores_kernel,
    "bwd_tokens": attention_pool._attention_pool_bwd_tokens_kernel,
}
# Pointer arguments in order; "name:dtype" fixes a pointer's dtype, other pointers take
# the input dtype.
_ATTENTION_POOL_ARGS = {
    "fwd": ("x_ptr", "t0_ptr", "pos_ptr", "u_ptr", "z_ptr", "lse_ptr:fp32"),
    "bwd_scores": ("x_ptr", "t0_ptr", "pos_ptr", "u_ptr", "lse_ptr:fp32", "dz_ptr", "p_ptr", "ds_ptr"),
    "bwd_tokens": ("x_ptr", "t0_ptr", "pos_ptr", "u_ptr", "dz_ptr", "p_ptr", "ds_ptr", "dtok_ptr:fp32",
                   "du_ptr:fp32"),
}
# then, in every kernel, the same i32 sizes and x strides
_ATTENTION_POOL_INTS = ("HW", "C", "H", "stride_xn", "stride_xl", "stride_xc")


def _attention_pool_signature(kernel: str, tl_dtype: str) -> dict[str, str]:
    sig = {}
    for arg in _ATTENTION_POOL_ARGS[kernel] + _ATTENTION_POOL_INTS:
        name, _, fixed = arg.partition(":")
        sig[name] = f"*{fixed}" if fixed else (f"*{tl_dtype}" if name.endswith("_ptr") else "i32")
    return {**sig, "BLOCK_L": "constexpr", "BLOCK_H": "constexpr", "BLOCK_C": "constexpr",
            "INPUT_PRECISION": "constexpr", "WIDEN": "constexpr"}


def attention_pool_configs() -> list[KernelConfig]:
    """Every distinct configuration the attention-pool launchers pick for the CLIP
    ResNets in bf16 (fp16 shares the code path and the tiles) and for RN50 in fp32."""
    configs: dict[str, KernelConfig] = {}
    cases = [(torch.bfloat16, shape) for shape in ATTENTION_POOL_SHAPES.values()]
    cases.append((torch.float32, ATTENTION_POOL_SHAPES["RN50"]))
    for dtype, (hw, heads) in cases:
        tl_dtype = _TL_DTYPE[dtype]
        for kernel, fn in _ATTENTION_POOL_KERNELS.items():
            cfg = attention_pool.block_config(dtype, hw, heads, kernel)
            name = f"attention_pool_{kernel}[{tl_dtype},L={cfg['BLOCK_L']},H={cfg['BLOCK_H']},C={cfg['BLOCK_C']}]"
            configs[name] = KernelConfig(
                name=name, fn=fn, signature=_attention_pool_signature(kernel, tl_dtype),
                constexprs=dict(BLOCK_L=cfg["BLOCK_L"], BLOCK_H=cfg["BLOCK_H"], BLOCK_C=cfg["BLOCK_C"],
                                INPUT_PRECISION=attention_pool._input_precision(dtype), WIDEN=False),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], uses_tensor_cores=True,
            )
    return list(configs.values())


# ----------------------------------------------------------------------------- SigLIP


def siglip_configs() -> list[KernelConfig]:
    """Every configuration the fused SigLIP launcher can pick (one per operand dtype)."""
    configs = []
    for dtype, cfg in siglip._CONFIGS.items():
        t = _TL_DTYPE[dtype]
        signature = {
            "I": f"*{t}", "T": f"*{t}", "params": "*fp32", "dI": "*fp32", "dT": "*fp32", "partials": "*fp32",
            "M": "i32", "N": "i32", "D": "i32",
            "stride_i": "i32", "stride_t": "i32", "stride_di": "i32", "stride_dt": "i32",
            "cols_per_prog": "i32", "has_pos": "i32", "inv_n": "fp32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "INPUT_PRECISION": "constexpr",
            "UPCAST_DOT": "constexpr",
        }
        constexprs = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                      "INPUT_PRECISION": cfg["precision"], "UPCAST_DOT": False}
        configs.append(KernelConfig(
            name=f"siglip_fused[{t}]", fn=siglip.siglip_fused_kernel, signature=signature, constexprs=constexprs,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], uses_tensor_cores=True,
        ))
    return configs


# ----------------------------------------------------------------------------- AdamW

_ADAMW_SIGNATURE = {
    "meta_ptr": "*i64",
    "blocks_ptr": "*i32",
    "exp_in_ptr": "*i32",
    "amax_in_ptr": "*fp32",
    "exp_out_ptr": "*i32",
    "amax_out_ptr": "*fp32",
    "count_ptr": "*i32",
    "beta1": "fp32",
    "one_minus_beta1": "fp32",
    "beta2": "fp32",
    "one_minus_beta2": "fp32",
    "decay": "fp32",
    "eps": "fp32",
    "P_KIND": "constexpr",
    "G_KIND": "constexpr",
    "S_KIND": "constexpr",
    "SR": "constexpr",
    "EXPLICIT": "constexpr",
    "BLOCK": "constexpr",
}
# torch's allocations are 16-byte aligned, so a launch specialises every pointer on it.
_ADAMW_POINTERS = tuple(name for name, kind in _ADAMW_SIGNATURE.items() if kind.startswith("*"))
_ADAMW_KIND_NAMES = {0: "fp32", 1: "bf16", 2: "fp16"}  # adamw.KIND's codes
# (param, grad, state, stochastic rounding) kinds of the production launches
_ADAMW_COMBOS = (
    (1, 1, 1, True),  # the default: bf16 weights, grads and moments, 6 bytes/param
    (1, 1, 2, True),
    (1, 1, 0, True),
    (1, 1, 1, False),
    (0, 0, 0, False),
    (2, 2, 2, True),
)


def adamw_configs() -> list[KernelConfig]:
    """The AdamW launcher's production configurations (EXPLICIT=True is a test-only
    path) and the stochastic-rounding cast."""
    names = _ADAMW_KIND_NAMES
    configs = []
    for pk, gk, sk, sr in _ADAMW_COMBOS:
        name = f"adamw_sr[p={names[pk]},g={names[gk]},m={names[sk]},{'sr' if sr else 'rne'}]"
        constexprs = dict(P_KIND=pk, G_KIND=gk, S_KIND=sk, SR=sr, EXPLICIT=False, BLOCK=adamw.BLOCK)
        configs.append(KernelConfig(name, adamw._adamw_kernel, _ADAMW_SIGNATURE, constexprs,
                                    aligned=_ADAMW_POINTERS, **adamw.ADAMW_LAUNCH_OPTIONS))
    configs.append(
        KernelConfig(
            "stochastic_round_bf16",
            adamw._stochastic_round_kernel,
            {"x_ptr": "*fp32", "y_ptr": "*i16", "rand_ptr": "*i32", "key": "i64", "numel": "i64",
             "EXPLICIT": "constexpr", "BLOCK": "constexpr"},
            dict(EXPLICIT=False, BLOCK=adamw.BLOCK),
            aligned=("x_ptr", "y_ptr", "rand_ptr"),
            **adamw.LAUNCH_OPTIONS,
        )
    )
    return configs


# ----------------------------------------------------------------------------- all


def all_configs() -> list[KernelConfig]:
    """Every configuration of every kernel module, in module order (names unique)."""
    configs = adamw_configs() + attention_pool_configs() + contrastive_configs() + siglip_configs()
    names = [c.name for c in configs]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise ValueError(f"duplicate kernel configuration names: {sorted(duplicated)}")
    return configs
