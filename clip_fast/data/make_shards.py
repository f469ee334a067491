"""Write webdataset shards (+ DALI indexes) from a folder or a CSV/TSV of captioned images.

    python -m clip_fast.data.make_shards SRC OUT [--shard-size N]

SRC is either
  - a folder (searched recursively) of images, each with a caption file of the same name
    and a `.txt` extension (`cat/001.png` + `cat/001.txt`), or
  - a .csv/.tsv file with an image-path column and a caption column (open_clip's defaults
    `filepath` and `title`; `--csv-img-key`, `--csv-caption-key`, `--csv-separator`).
    Relative image paths are resolved against the CSV's folder.

Every image is decoded before it is written, so the shards contain no corrupt image;
JPEGs in RGB or greyscale are stored as they are, anything else (PNG, WebP, CMYK
JPEG, ...) is re-encoded as an RGB JPEG. Samples are written in a shuffled order (a
seeded permutation: batches read sequentially from a shard should not all come from one
source folder). Skipped inputs are counted by reason and listed in the summary.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .images import to_8bit
from .shards import ShardWriter

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_folder(src: Path, skipped: Counter, examples: dict) -> list[tuple[Path, Path | str]]:
    """(image path, caption path) pairs of a folder tree; images without a caption and
    captions (.txt) without an image are counted and listed as skipped."""
    items = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        image_stems = {Path(n).stem for n in filenames if Path(n).suffix.lower() in IMAGE_SUFFIXES and not n.startswith(".")}
        for name in sorted(filenames):
            if name.endswith(".txt") and not name.startswith(".") and Path(name).stem not in image_stems:
                skipped["missing_image"] += 1
                examples["missing_image"].append(str(Path(dirpath) / name))
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES or name.startswith("."):
                continue
            caption = path.with_suffix(".txt")
            if not caption.is_file():
                skipped["missing_caption"] += 1
                examples["missing_caption"].append(str(path))
                continue
            items.append((path, caption))
    return items


def list_csv(src: Path, img_key: str, caption_key: str, separator: str | None) -> list[tuple[Path, Path | str]]:
    """(image path, caption text) pairs of a CSV/TSV file."""
    if separator is None:
        separator = "\t" if src.suffix.lower() in (".tsv", ".tab") else ","
    with open(src, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
            if key not in columns:
                raise ValueError(f"{src}: no column {key!r} (columns: {columns}); choose one with {flag}")
        items = []
        for row in reader:
            image = Path(row[img_key] or "")
            items.append((image if image.is_absolute() else src.parent / image, row[caption_key] or ""))
    return items


def prepare(item: tuple[Path, Path | str], quality: int) -> tuple[bytes | None, str | None, str | None]:
    """Validate one sample: (jpeg bytes, caption, None) or (None, None, skip reason)."""
    from PIL import Image

    image_path, caption = item
    if isinstance(caption, Path):
        try:
            caption = caption.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return None, None, "bad_caption_encoding"
        except OSError:
            return None, None, "missing_caption"
    caption = caption.strip()
    if not caption:
        return None, None, "empty_caption"
    try:
        data = image_path.read_bytes()
    except OSError:
        return None, None, "missing_image"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: truncated or damaged files fail here
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                return data, caption, None
            img = to_8bit(img)  # 16-bit greyscale would come out white
            if img.mode != "RGB":
                # Transparent pixels over white, as a viewer shows them, not as black.
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            return buf.getvalue(), caption, None
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None, None, "corrupt_image"


def make_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 10000,
    csv_img_key: str = "filepath",
    csv_caption_key: str = "title",
    csv_separator: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    quality: int = 95,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write shards; returns a summary dict (written, shards, skipped, examples)."""
    src, out = Path(src), Path(out)
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    if src.is_dir():
        items = list_folder(src, skipped, examples)
    elif src.is_file():
        items = list_csv(src, csv_img_key, csv_caption_key, csv_separator)
    else:
        raise FileNotFoundError(f"SRC not found: {src} (expected a folder or a .csv/.tsv file)")
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    workers = workers or min(8, os.cpu_count() or 1)
    total, start, last_print = len(items), time.time(), 0.0
    chunk = 64 * workers  # bounded read-ahead: memory stays O(chunk) images
    with ShardWriter(out, shard_size=shard_size) as writer, ThreadPoolExecutor(workers) as pool:
        for lo in range(0, total, chunk):
            batch = items[lo : lo + chunk]
            for item, (data, caption, reason) in zip(batch, pool.map(lambda it: prepare(it, quality), batch)):
                if reason is not None:
                    skipped[reason] += 1
                    examples[reason].append(str(item[0]))
                else:
                    writer.write(data, caption)
            now = time.time()
            if progress and (now - last_print > 1.0 or lo + chunk >= total):
                done = min(lo + chunk, total)
                rate = done / max(now - start, 1e-9)
                print(f"\r[make_shards] {done}/{total} inputs, {writer.num_samples} written, "
                      f"{sum(skipped.values())} skipped, {rate:.0f}/s", end="", file=sys.stderr, flush=True)
                last_print = now
        shards = writer.close()
    if progress and total:
        print(file=sys.stderr)
    return {"written": writer.num_samples, "shards": shards, "skipped": dict(skipped), "examples": dict(examples)}


def format_summary(summary: dict, out: str | os.PathLike) -> str:
    lines = [f"wrote {summary['written']} samples in {len(summary['shards'])} shard(s) to {out}"]
    n_skipped = sum(summary["skipped"].values())
    lines.append(f"skipped {n_skipped} input(s)" + (":" if n_skipped else ""))
    for reason, count in sorted(summary["skipped"].items()):
        shown = summary["examples"].get(reason, [])[:5]
        more = f" (+{count - len(shown)} more)" if count > len(shown) else ""
        lines.append(f"  {reason}: {count}  e.g. {', '.join(shown)}{more}" if shown else f"  {reason}: {count}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip_fast.data.make_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="folder of images + same-named .txt captions, or a .csv/.tsv file")
    parser.add_argument("out", help="output folder for the .tar shards, .idx indexes and manifest")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument("--csv-img-key", default="filepath", help="CSV column with image paths (default filepath)")
    parser.add_argument("--csv-caption-key", default="title", help="CSV column with captions (default title)")
    parser.add_argument("--csv-separator", default=None, help="CSV separator (default: tab for .tsv, else comma)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order shuffle")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    parser.add_argument("--workers", type=int, default=None, help="decode/encode threads (default min(8, cores))")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be in [1, 100]")
    try:
        summary = make_shards(args.src, args.out, args.shard_size, args.csv_img_key, args.csv_caption_key,
                              args.csv_separator, not args.no_shuffle, args.seed, args.quality, args.workers, not args.quiet)
    except (FileNotFoundError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, args.out))
    return 0 if summary["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
