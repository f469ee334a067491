"""A built-in captioned dataset: coloured shapes, generated deterministically in seconds.

Each image shows one shape (circle, square, triangle, cross) in one colour on a dark or
light background, small or large, at one of nine positions; its caption says so in one
of several phrasings ("a photo of a small red circle in the top left."). Some colour /
shape combinations never occur in the training or validation captions: the zero-shot
set (an ImageFolder, one folder per class such as `red_circle`) contains images of every
combination, so zero-shot accuracy on the held-out classes measures whether a model
composed "red" and "circle" rather than memorised "red circle".

    demo = ensure_demo_dataset()              # cached under $CLIP_FAST_CACHE/demo
    loader = build_loader(demo.train_shards, ...)
    classnames = demo.classnames              # ["red circle", ...] for zero-shot prompts
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .shards import ShardWriter, cache_root

_VERSION = 1
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle", "cross")
# One held-out shape per colour for four colours (a Latin-square pattern, so every colour
# and every shape still appears in training with other partners).
HELDOUT = (("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"))
SIZES = {"small": 0.28, "large": 0.5}  # shape extent as a fraction of the image side
POSITIONS = {  # name -> centre (x, y) as fractions of the image side
    "in the top left": (0.27, 0.27), "at the top": (0.5, 0.27), "in the top right": (0.73, 0.27),
    "on the left": (0.27, 0.5), "in the centre": (0.5, 0.5), "on the right": (0.73, 0.5),
    "in the bottom left": (0.27, 0.73), "at the bottom": (0.5, 0.73), "in the bottom right": (0.73, 0.73),
}
BACKGROUNDS = {"dark": (30, 90), "light": (170, 235)}  # grey level range
TEMPLATES = (
    "a photo of a {size} {color} {shape} {pos}.",
    "a {size} {color} {shape} {pos} on a {bg} background.",
    "a {color} {shape} {pos}.",
    "there is a {size} {color} {shape} {pos}.",
    "a {bg} picture with a {color} {shape}.",
    "{color} {shape}, {size}, {pos}.",
)


@dataclass
class DemoDataset:
    """Paths and metadata of the generated demo dataset."""

    train_shards: list[str]
    val_shards: list[str]
    classnames: list[str]  # every colour/shape combination, e.g. "red circle"
    zeroshot_dir: str  # ImageFolder: <zeroshot_dir>/<class name with underscores>/*.jpg
    captions: list[str]  # training captions (to train a tokenizer on)
    heldout_classnames: list[str] = field(default_factory=list)  # combinations absent from train/val captions
    image_size: int = 64


def _render(rng: np.random.Generator, image_size: int, color: str, shape: str, size: str, pos: str, bg: str) -> bytes:
    """One JPEG of `shape` (drawn at 2x and downsampled: anti-aliased edges)."""
    from PIL import Image, ImageDraw

    ss = 2 * image_size
    level = int(rng.integers(*BACKGROUNDS[bg]))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(level + t, 0, 255)) for t in tint)
    img = Image.new("RGB", (ss, ss), background)
    draw = ImageDraw.Draw(img)
    cx, cy = POSITIONS[pos]
    jitter = rng.uniform(-0.05, 0.05, size=2)
    cx, cy = (cx + jitter[0]) * ss, (cy + jitter[1]) * ss
    r = SIZES[size] * ss / 2 * rng.uniform(0.9, 1.1)
    fill = tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(COLORS[color], rng.integers(-20, 21, size=3)))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=fill)
    else:  # cross
        t = r * 0.32
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    img = img.resize((image_size, image_size), Image.BOX)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sample(rng: np.random.Generator, combos: list[tuple[str, str]]) -> tuple[str, str, str, str, str]:
    color, shape = combos[int(rng.integers(len(combos)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    pos = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return color, shape, size, pos, bg


def _generate(out: Path, image_size: int, num_train: int, num_val: int, num_zeroshot_per_class: int, shard_size: int) -> DemoDataset:
    seen = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT]
    captions: list[str] = []
    splits = {}
    for split, n, seed in (("train", num_train, 0), ("val", num_val, 1)):
        rng = np.random.default_rng([_VERSION, seed, image_size])
        with ShardWriter(out / split, shard_size=shard_size, prefix=split) as writer:
            for _ in range(n):
                color, shape, size, pos, bg = _sample(rng, seen)
                template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
                caption = template.format(size=size, color=color, shape=shape, pos=pos, bg=bg)
                writer.write(_render(rng, image_size, color, shape, size, pos, bg), caption)
                if split == "train":
                    captions.append(caption)
        splits[split] = [str(Path(p).relative_to(out)) for p in writer.close()]
    rng = np.random.default_rng([_VERSION, 2, image_size])
    classnames = [f"{c} {s}" for c in COLORS for s in SHAPES]
    for color in COLORS:
        for shape in SHAPES:
            folder = out / "zeroshot" / f"{color}_{shape}"
            folder.mkdir(parents=True)
            for i in range(num_zeroshot_per_class):
                _, _, size, pos, bg = _sample(rng, [(color, shape)])
                (folder / f"{i:04d}.jpg").write_bytes(_render(rng, image_size, color, shape, size, pos, bg))
    meta = {
        "train_shards": splits["train"], "val_shards": splits["val"], "classnames": classnames,
        "zeroshot_dir": "zeroshot", "captions": captions,
        "heldout_classnames": [f"{c} {s}" for c, s in HELDOUT], "image_size": image_size,
    }
    (out / "demo.json").write_text(json.dumps(meta))
    return meta


def ensure_demo_dataset(
    root: str | os.PathLike | None = None,
    image_size: int = 64,
    num_train: int = 8192,
    num_val: int = 1024,
    num_zeroshot_per_class: int = 20,
    shard_size: int = 2048,
) -> DemoDataset:
    """Generate (once) and return the demo dataset; later calls return the cached copy.

    root defaults to $CLIP_FAST_CACHE/demo (~/.cache/clip_fast/demo). The dataset lives in
    a subfolder named after the arguments, written to a temporary folder and renamed into
    place, so concurrent callers (several ranks) never see a half-written dataset.
    """
    for name, value, lo in (("image_size", image_size, 16), ("num_train", num_train, 1), ("num_val", num_val, 1),
                            ("num_zeroshot_per_class", num_zeroshot_per_class, 1), ("shard_size", shard_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    root = Path(root).expanduser() if root is not None else cache_root() / "demo"
    final = root / f"v{_VERSION}-s{image_size}-t{num_train}-v{num_val}-z{num_zeroshot_per_class}-b{shard_size}"
    if not (final / "demo.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            _generate(tmp, image_size, num_train, num_val, num_zeroshot_per_class, shard_size)
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished first: use its copy
                if not (final / "demo.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((final / "demo.json").read_text())
    return DemoDataset(
        train_shards=[str(final / p) for p in meta["train_shards"]],
        val_shards=[str(final / p) for p in meta["val_shards"]],
        classnames=meta["classnames"],
        zeroshot_dir=str(final / meta["zeroshot_dir"]),
        captions=meta["captions"],
        heldout_classnames=meta["heldout_classnames"],
        image_size=meta["image_size"],
    )
