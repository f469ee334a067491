"""Image decoding and open_clip's transforms, shared by make_shards and the loaders.

16-bit greyscale PNGs (and TIFFs) open in Pillow as modes "I;16*" or "I", whose
`convert("RGB")` / `convert("L")` clip every value above 255: the image comes out white.
`to_8bit` maps them to 8-bit "L" as `v >> 8` (the high byte, floor(v / 256)), the reduction
Pillow itself applies when it decodes 16-bit RGB / RGBA PNGs, so every 16-bit PNG ends up
scaled the same way (within 1 of round(v * 255 / 65535)).
"""
from __future__ import annotations

import math

import numpy as np
import torch

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(img):
    """`img` (a PIL image) with 16-bit greyscale reduced to 8-bit "L"; other modes unchanged."""
    from PIL import Image

    if img.mode not in _SIXTEEN_BIT_MODES:
        return img
    values = np.asarray(img).astype(np.int64)  # native-endian values whatever the mode's byte order
    return Image.fromarray(np.clip(values >> 8, 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters: (left, top, w, h) of the crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the whole image, clamped to the allowed aspect range, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def pil_transform(img, image_size: int, train: bool, rng: np.random.Generator | None = None) -> np.ndarray:
    """open_clip's image transform on a PIL image, up to the uint8 (S, S, 3) array."""
    from PIL import Image

    img = to_8bit(img).convert("RGB")
    s = image_size
    if train:
        left, top, w, h = random_resized_crop_box(img.width, img.height, rng)
        # Crop, then resize, as torchvision does. (resize(box=...) would save the copy but
        # its filter reads pixels outside the box near the edges: up to 12/255 different.)
        img = img.crop((left, top, left + w, top + h)).resize((s, s), Image.BICUBIC)
    else:
        nw, nh, left, top = eval_geometry(img.width, img.height, s)
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), Image.BICUBIC)
        img = img.crop((left, top, left + s, top + s))
    return np.asarray(img, dtype=np.uint8)


def eval_geometry(width: int, height: int, image_size: int) -> tuple[int, int, int, int]:
    """torchvision's Resize(S) + CenterCrop(S): (resized w, resized h, crop left, crop top)."""
    s = image_size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = s, int(s * long / short)  # torchvision Resize(int) rounding
    nw, nh = (new_short, new_long) if width <= height else (new_long, new_short)
    return nw, nh, int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))  # CenterCrop's rounding


def resize_uint8(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """uint8 (h, w, 3) -> uint8 (height, width, 3), Pillow's bicubic (a = -0.5, antialiased).

    torch's uint8 antialiased kernels (AVX2, fixed-point like Pillow's) reproduce
    `PIL.Image.resize(..., BICUBIC)` to 0.004/255 mean, 2/255 max difference on the
    benchmark images, several times faster than Pillow and than DALI's CPU resampler
    (docs/benchmarks.md).
    """
    x = image.permute(2, 0, 1)[None]  # (1, 3, h, w), channels-last strides: the fast path
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True)
    return y[0].permute(1, 2, 0)  # (height, width, 3)
