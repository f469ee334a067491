"""Batches straight from open_clip's `--dataset-type csv` files (no make_shards step).

    loader = build_csv_loader("train.csv", img_key="filepath", caption_key="title", separator="\\t",
                              batch_size=256, image_size=224, tokenize=tokenizer)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, tokens in loader:   # (B, 3, 224, 224), (B, 77) int64
            ...

The returned loader has `build_loader`'s interface and semantics (set_epoch, len, stats,
drop_last, device/dtype, open_clip's train/eval transforms through PIL), read by torch
DataLoader workers. The epoch split, per epoch e:

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
from typing import Callable

import numpy as np
import torch

from .loader import TorchShardLoader, check_loader_args, pil_transform
from .shards import check_image_bytes

log = logging.getLogger("clip_fast.data")


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


def _read_columns(path: str, img_key: str, caption_key: str, separator: str) -> tuple[list[str], list[str]]:
    """(image column, caption column) of a CSV file; ValueError for a missing column."""
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


def read_csv_rows(path: str, img_key: str = "filepath", caption_key: str = "title", separator: str = "\t",
                  verify_images: bool = False, num_threads: int = 4) -> CsvRows:
    """The rows of `path` that have a non-empty caption and an existing (with
    `verify_images`: decodable) image file, in file order; the others are counted by reason."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file not found: {path}")
    if not isinstance(separator, str) or len(separator) != 1:
        raise ValueError(f"separator must be one character, got {separator!r}")
    images, captions = _read_columns(path, img_key, caption_key, separator)
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


class _CsvDataset(torch.utils.data.Dataset):
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


class CsvLoader(TorchShardLoader):
    """torch DataLoader + PIL over the rows of a CSV file (see the module docstring)."""

    backend = "torch"

    @property
    def rows(self) -> CsvRows:
        return self.shards[0]

    def _plan(self, epoch: int) -> tuple[np.ndarray, int, int]:
        """(row order shared by all ranks, first position of this rank's slice, slice length)."""
        n, w, r = self.num_samples, self.world_size, self.rank
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.train else np.arange(n)
        start, stop = r * n // w, (r + 1) * n // w
        return order, start, stop - start

    def _sample_plan(self, epoch: int) -> tuple[_CsvDataset, list[list[int]]]:
        """The epoch's dataset over the usable rows and this rank's batches of row numbers."""
        order, start, count = self._plan(epoch)
        rows = order[start : start + count]
        batches = [rows[i : i + self.batch_size].tolist() for i in range(0, count, self.batch_size)][: len(self)]
        return _CsvDataset(self.rows, self.image_size, self.train, self.seed, epoch), batches

    def _source_note(self) -> str:
        return f" of {self.rows.path}"

    def __repr__(self) -> str:
        return (f"CsvLoader(path={self.rows.path!r}, samples={self.num_samples}, batch_size={self.batch_size}, "
                f"image_size={self.image_size}, train={self.train}, rank={self.rank}/{self.world_size}, device={self.device})")


def build_csv_loader(
    path: str,
    *,
    img_key: str = "filepath",
    caption_key: str = "title",
    separator: str = "\t",
    batch_size: int,
    image_size: int,
    tokenize: Callable[[list[str]], torch.Tensor],
    train: bool = True,
    backend: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 2,
    seed: int = 0,
    drop_last: bool | None = None,
    verify_images: bool = False,
) -> CsvLoader:
    """Build a loader over an open_clip CSV file (see the module docstring for the semantics).

    Args:
        path: the CSV file; img_key / caption_key: its image-path and caption columns
            (open_clip's --csv-img-key / --csv-caption-key); separator: --csv-separator.
        backend: "auto" or "torch" (DALI reads webdataset shards only: convert with make_shards).
        verify_images: decode-check every image when building (bad ones are left out and
            counted) instead of replacing them at run time.
        The other arguments are `clip_fast.data.loader.build_loader`'s.
    """
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch' for a CSV file, got {backend!r} "
                         "(the DALI reader needs webdataset shards: python -m clip_fast.data.make_shards)")
    device = check_loader_args(batch_size=batch_size, image_size=image_size, tokenize=tokenize, rank=rank,
                               world_size=world_size, device=device, dtype=dtype, num_workers=num_workers)
    rows = read_csv_rows(os.fspath(path), img_key, caption_key, separator, verify_images, max(1, num_workers))
    if rows.skipped:
        log.warning("clip_fast.data: skipped %d row(s) of %s: %s", sum(rows.skipped.values()), path, dict(rows.skipped))
    if not rows.images:
        raise ValueError(f"{path}: no usable rows (skipped: {dict(rows.skipped)})")
    drop_last = train if drop_last is None else drop_last
    if drop_last and (len(rows) // world_size) // batch_size == 0:
        raise ValueError(
            f"batch_size={batch_size} is larger than this rank's share of the data "
            f"({len(rows) // world_size} samples = {len(rows)} / world_size {world_size}) with drop_last=True"
        )
    return CsvLoader([rows], batch_size=batch_size, image_size=image_size, tokenize=tokenize, train=train, rank=rank,
                     world_size=world_size, device=device, dtype=dtype, num_workers=num_workers, seed=seed,
                     drop_last=drop_last, shuffle_buffer=1)  # shuffle_buffer: DALI's, unused here
