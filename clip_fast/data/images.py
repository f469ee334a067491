"""Image decoding fixes shared by make_shards and the torch loader.

16-bit greyscale PNGs (and TIFFs) open in Pillow as modes "I;16*" or "I", whose
`convert("RGB")` / `convert("L")` clip every value above 255: the image comes out white.
`to_8bit` maps them to 8-bit "L" as `v >> 8` (the high byte, floor(v / 256)), the reduction
Pillow itself applies when it decodes 16-bit RGB / RGBA PNGs, so every 16-bit PNG ends up
scaled the same way (within 1 of round(v * 255 / 65535)).
"""
from __future__ import annotations

import numpy as np

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(img):
    """`img` (a PIL image) with 16-bit greyscale reduced to 8-bit "L"; other modes unchanged."""
    from PIL import Image

    if img.mode not in _SIXTEEN_BIT_MODES:
        return img
    values = np.asarray(img).astype(np.int64)  # native-endian values whatever the mode's byte order
    return Image.fromarray(np.clip(values >> 8, 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"
