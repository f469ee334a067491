"""Sample payloads for hand-made shards: smooth JPEG images that every resampler treats
alike, shards of them, and a caption "tokenizer" that returns the sample number, so
loaders' outputs can be counted."""
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


def write_smooth_shards(out, count, shard_size, seed, size_range=None, size=None):
    """ShardWriter shards in `out` of `count` smooth JPEGs captioned "sample i", each side
    drawn from [size_range[0], size_range[1]) (height first) or the fixed (h, w) `size`;
    returns the sorted tar paths."""
    from clip_fast.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(out, shard_size=shard_size) as writer:
        for i in range(count):
            if size is None:
                h = int(rng.integers(*size_range))
                w = int(rng.integers(*size_range))
            else:
                h, w = size
            writer.write(jpeg(smooth_image(rng, h, w)), f"sample {i}")
    return sorted(str(p) for p in out.glob("*.tar"))
