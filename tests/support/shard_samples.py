"""Sample payloads for hand-made shards: smooth JPEG images that every resampler treats
alike, and a caption "tokenizer" that returns the sample number, so loaders' outputs can
be counted."""
import io
import tarfile

import numpy as np
import torch
from PIL import Image


def smooth_image(rng, h, w):
    """Natural-ish content (smooth colour fields + an edge): resamplers agree on it."""
    low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    a = np.asarray(img).copy()
    a[h // 3 : h // 2, w // 4 : w // 2] = rng.integers(0, 256, size=3)
    return Image.fromarray(a)


def jpeg(img, quality=92):
    """The image encoded as JPEG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def caption_id_tokenize(captions):
    """Test 'tokenizer': the sample number written in the caption, so samples can be counted."""
    return torch.tensor([[int(c.rsplit(" ", 1)[-1])] for c in captions], dtype=torch.long)


def write_tar(path, members):
    """A tar file of (member name, bytes) pairs, in order (hand-made or damaged shards)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
