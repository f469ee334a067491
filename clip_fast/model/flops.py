"""FLOPs per sample of a clip_fast CLIP and model FLOPs utilisation (nanoGPT's estimate_mfu).

Counts are matmul FLOPs (2 per multiply-add) of the forward pass; a training step is
3x that (the backward pass costs two forward passes). The towers' own shortcuts are
counted as they run: the last block of each Transformer computes its query, output and
MLP for one position (the class / EOT token), the text tower runs over the trimmed
caption length, patch dropout removes tokens.
"""
from __future__ import annotations

import torch
from torch import nn

# Dense (no sparsity) tensor-core peak FLOP/s per GPU, bf16/fp16 inputs with fp32
# accumulation, matched in order against torch.cuda.get_device_name(). TF32 runs at half.
PEAK_FLOPS_BF16 = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200 NVL", 835e12), ("H100 NVL", 835e12), ("H200", 989e12),
    ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
    ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)
# Plain fp32 (CUDA cores) peak, used for fp32 training when TF32 is off.
PEAK_FLOPS_FP32 = (
    ("H200 NVL", 60e12), ("H100 NVL", 60e12), ("H200", 67e12), ("GH200", 67e12), ("H100 PCIe", 51e12),
    ("H100", 67e12), ("A100", 19.5e12), ("L40S", 91.6e12), ("L4", 30.3e12), ("A10", 31.2e12),
    ("RTX 4090", 82.6e12), ("V100", 15.7e12), ("T4", 8.1e12),
)


def transformer_flops(tokens: float, width: int, layers: int, mlp_ratio: float, causal: bool, pooled: bool) -> float:
    """Forward matmul FLOPs of a Transformer over `tokens` positions. With `pooled` the
    last block runs its query/out/MLP for one position only (as clip_fast's towers do)."""
    hidden = int(width * mlp_ratio)
    per_token = 2 * (3 * width * width + width * width + 2 * width * hidden)  # qkv, out, fc + proj
    attn = 2 * 2 * tokens * tokens * width * (0.5 if causal else 1.0)  # QK^T and AV
    full = layers - (1 if pooled else 0)
    flops = full * (tokens * per_token + attn)
    if pooled:
        kv = tokens * 2 * 2 * width * width  # K and V for every position
        one = 2 * (width * width + width * width + 2 * width * hidden) + 2 * 2 * tokens * width
        flops += kv + one
    return flops


@torch.no_grad()
def image_flops_per_sample(model: nn.Module, device: torch.device | str = "cpu") -> float:
    """Forward FLOPs of the image tower for one image: analytic for the ViT (matmuls), a
    torch FlopCounterMode count (convolutions + matmuls) for the ModifiedResNet."""
    cfg = model.config
    v = cfg.vision
    if not v.is_resnet:
        grid = (v.image_size // v.patch_size) ** 2
        tokens = 1 + grid * (1.0 - v.patch_dropout)
        patch = 2 * grid * 3 * v.patch_size**2 * v.width
        return patch + transformer_flops(tokens, v.width, v.layers, v.mlp_ratio, False, True) + 2 * v.width * cfg.embed_dim
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()  # BatchNorm statistics untouched
    x = torch.zeros(1, 3, v.image_size, v.image_size, device=device, dtype=next(model.parameters()).dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        model.encode_image(x)
    model.train(was_training)
    return float(counter.get_total_flops())


def text_flops_per_sample(config, tokens: float) -> float:
    """Forward FLOPs of the text tower for one caption run over `tokens` positions."""
    t = config.text
    return transformer_flops(tokens, t.width, t.layers, t.mlp_ratio, True, True) + 2 * t.width * config.embed_dim


def tf32_enabled() -> bool:
    return torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for a clip_fast precision mode (None on CPU or an
    unknown GPU). fp32 is quoted against TF32 only when TF32 matmuls are enabled."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    fp32 = precision == "fp32"
    table = PEAK_FLOPS_FP32 if fp32 and not tf32_enabled() else PEAK_FLOPS_BF16
    for key, value in table:
        if key in name:
            return value / 2 if fp32 and table is PEAK_FLOPS_BF16 else value
    return None


def train_flops_per_sample(model: nn.Module, image_flops: float, text_tokens: float) -> float:
    """FLOPs of one training sample (forward + backward = 3 forwards) given the image
    tower's forward FLOPs and the mean text length the tower ran."""
    return 3 * (image_flops + text_flops_per_sample(model.config, text_tokens))


def estimate_mfu(flops_per_sample: float, samples_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak (None without one)."""
    return flops_per_sample * samples_per_second / peak if peak else None
