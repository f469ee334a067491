"""open_clip's `--dataset-type csv` files read directly (no make_shards step).

    loader = build_loader("train.csv", batch_size=256, image_size=224, tokenize=tokenizer,
                          csv=CsvColumns(img_key="filepath", caption_key="title", separator="\\t"))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, tokens in loader:   # (B, 3, 224, 224), (B, 77) int64
            ...

`clip_fast.data.loader.build_loader(path, ..., csv=CsvColumns(...))` returns a `CsvLoader`
with the shard loaders' interface and semantics (set_epoch, len, stats, drop_last,
device/dtype, open_clip's train/eval transforms through PIL), read by torch DataLoader
workers. This module reads the file (`read_csv_rows`) and serves its rows (`CsvDataset`).
The epoch split, per epoch e:

  1. the usable rows, in file order, are permuted with a generator seeded by (seed, e)
     that every rank shares (train; eval keeps the file order);
  2. rank r of W takes positions [floor(r N / W), floor((r+1) N / W)) of that order,
     so every row is read exactly once per epoch across ranks, and each rank sees a
     different subset in each epoch.

Image paths are taken relative to the CSV's folder (absolute paths as they are); a
relative path that is not found there but exists relative to the working directory, as
open_clip resolves it, is taken from there. Rows with an empty caption or no image file
are left out when the loader is built and counted in `stats.skipped` (`empty_caption`,
`missing_image`). Images that do not decode are left out at build time too with
`verify_images=True` (`corrupt_image`; a reduced-size decode of every image); otherwise
each one is replaced at run time by the next row and counted in `stats.decode_errors`.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .images import pil_transform
from .shards import check_image_bytes

log = logging.getLogger("clip_fast.data")


@dataclass(frozen=True)
class CsvColumns:
    """Where a CSV file keeps its data: open_clip's --csv-img-key, --csv-caption-key and
    --csv-separator (same defaults)."""

    img_key: str = "filepath"
    caption_key: str = "title"
    separator: str = "\t"


@dataclass
class CsvRows:
    """The usable rows of a CSV file: resolved image paths and their captions."""

    path: str
    images: list[str]
    captions: list[str]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.images)


def _resolve(image: str, base: str) -> str:
    """An image path of the CSV: absolute as is; relative to the CSV's folder, else to the cwd."""
    if os.path.isabs(image):
        return image
    beside = os.path.join(base, image)
    if os.path.isfile(beside) or not os.path.isfile(image):
        return beside
    return image


def _read_columns(path: str, columns: CsvColumns) -> tuple[list[str], list[str]]:
    """(image column, caption column) of a CSV file; ValueError for a missing column."""
    img_key, caption_key, separator = columns.img_key, columns.caption_key, columns.separator
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=separator)
        header = next(reader, None) or []
        for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
            if key not in header:
                raise ValueError(f"{path}: no column {key!r} (columns: {header}); choose one with {flag} (separator {separator!r})")
        i_img, i_cap = header.index(img_key), header.index(caption_key)
        images, captions = [], []
        for row in reader:
            if not row:
                continue  # blank line
            images.append(row[i_img] if i_img < len(row) else "")
            captions.append(row[i_cap] if i_cap < len(row) else "")
    return images, captions


def read_csv_rows(path: str, columns: CsvColumns = CsvColumns(), verify_images: bool = False,
                  num_threads: int = 4) -> CsvRows:
    """The rows of `path` that have a non-empty caption and an existing (with
    `verify_images`: decodable) image file, in file order; the others are counted by reason."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file not found: {path}")
    if not isinstance(columns.separator, str) or len(columns.separator) != 1:
        raise ValueError(f"separator must be one character, got {columns.separator!r}")
    images, captions = _read_columns(path, columns)
    base = os.path.dirname(os.path.abspath(path))
    with ThreadPoolExecutor(max(1, num_threads)) as pool:  # stat/decode release the GIL
        checked = list(pool.map(lambda image: _check_row_image(image, base, verify_images), images))
    rows = CsvRows(str(path), [], [])
    for (image, reason), caption in zip(checked, captions):
        if not caption.strip():
            reason = "empty_caption"
        if reason is not None:
            rows.skipped[reason] += 1
            continue
        rows.images.append(image)
        rows.captions.append(caption)
    return rows


def _check_row_image(image: str, base: str, verify: bool) -> tuple[str, str | None]:
    """(resolved path, None or the reason to skip the row) of one image cell."""
    path = _resolve(image, base) if image.strip() else ""
    if not path or not os.path.isfile(path):
        return path, "missing_image"
    if verify:
        with open(path, "rb") as f:
            return path, None if check_image_bytes(f.read()) else "corrupt_image"
    return path, None


class CsvDataset(torch.utils.data.Dataset):
    """Map-style view over the usable rows: (uint8 (S, S, 3) image, caption, retries)."""

    def __init__(self, rows: CsvRows, image_size: int, train: bool, seed: int, epoch: int) -> None:
        self.images, self.captions = rows.images, rows.captions
        self.image_size, self.train, self.seed, self.epoch = image_size, train, seed, epoch

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> np.ndarray:
        from PIL import Image

        # Per-row generator: crops depend on (seed, epoch, row), not on which worker ran it.
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        with open(self.images[i], "rb") as f, Image.open(io.BytesIO(f.read())) as img:
            return pil_transform(img, self.image_size, self.train, rng)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, int]:
        # An image that fails to load is replaced by the next row (batches keep their
        # size); the number of replacements travels with the sample.
        for tries in range(len(self)):
            j = (i + tries) % len(self)
            try:
                return self.load(j), self.captions[j], tries
            except Exception as e:  # PIL/OS errors of every kind
                log.debug("row %d (%s) failed to load: %s", j, self.images[j], e)
        raise RuntimeError("no image of the CSV file could be decoded")
