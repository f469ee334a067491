"""Training/eval batches from webdataset shards: DALI (GPU or CPU decode) or torch + PIL.

    loader = build_loader(shards, batch_size=256, image_size=224, tokenize=tokenizer,
                          device="cuda", dtype=torch.bfloat16, rank=rank, world_size=world)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, tokens in loader:   # (B, 3, 224, 224) bf16 on cuda, (B, L <= 77) int64
            ...

Both backends follow the same sample plan, from the same shard indexes (see shards.py):

  1. the shard order is shuffled per epoch (train) with a seed every rank shares;
  2. the concatenated sample list is cut into `world_size` contiguous slices, rank r
     taking samples [floor(r N / W), floor((r+1) N / W)), so every sample is read
     exactly once per epoch across ranks;
  3. the slice is permuted (train) and cut into batches; training crop windows are drawn
     per (seed, epoch, sample). `set_epoch(epoch, start_batch)` resumes mid-epoch without
     reading the batches before `start_batch`.

With `drop_last` (the default for training) every rank yields floor(floor(N / W) / B)
full batches: equal counts on every rank, which collective losses need.

Resampled epochs (`resampled_samples=M`, open_clip's --dataset-resampled; torch backend
only): each rank draws whole shards uniformly *with replacement* from a generator seeded
by (seed, epoch, rank) until it holds M // W samples, permutes them and keeps the first
M // W. An epoch is then M samples whatever the data size, a shard may be read several
times or not at all, and the plan is a pure function of (seed, epoch, rank): a resumed
run replays it exactly.

Tokens: the batch is tokenised off the training thread (DataLoader workers; a background
thread for DALI), cut on the CPU to its longest caption rounded up to a multiple of 16
(`prepare_tokens`: the text tower then reads no token value on the host), pinned when
CUDA is available, and copied asynchronously.

Transforms (open_clip's): train = random resized crop (scale 0.9-1.0, aspect 3/4-4/3) to
image_size, bicubic; eval = bicubic resize of the shorter side to image_size, centre
crop. Then CLIP's mean/std normalisation, CHW, `dtype`, on `device`. The bicubic is
Pillow's (a = -0.5, antialiased when shrinking) in every CPU path: PIL itself in the torch
path; torch's uint8 kernels, which reproduce it, after DALI's CPU decode. DALI on a GPU
resamples with its own cubic filter (0.15-0.2/255 mean difference from Pillow's on the
eval test images, measured with the same filter on CPU).
"""
from __future__ import annotations

import gc
import io
import logging
import os
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .._warnings import warn_once
from .csv_dataset import CsvColumns, CsvDataset, CsvRows, read_csv_rows
from .images import eval_geometry, pil_transform, random_resized_crop_box, resize_uint8
from .shards import ShardIndex, expand_shards, load_shard_indexes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("auto", "dali", "torch")
log = logging.getLogger("clip_fast.data")


@dataclass
class LoaderStats:
    """What a loader reads and what it had to leave out.

    samples: good samples in the whole shard list (all ranks); rank_samples: this rank's
    share in the current epoch; skipped: samples left out when the shards were indexed,
    by reason (corrupt_image, missing_caption, empty_caption, bad_caption_encoding,
    missing_image, truncated_shard; unreadable_shard counts shards: see shards.SKIP_REASONS); decode_errors: images that still failed to decode
    at run time (torch path; each is replaced by the next sample of the list).
    """

    samples: int
    rank_samples: int
    skipped: Counter = field(default_factory=Counter)
    decode_errors: int = 0

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values()) + self.decode_errors


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken install failing to load its libraries
        return False
    return True


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> CLIP-normalised (B, 3, H, W) in `dtype` (on images' device).

    `(x / 255 - mean) / std` folded into one multiply-add per element, computed in fp32.
    """
    if images.device.type == "cpu":  # image by image, cache-resident (see _Normalizer)
        out = torch.empty((images.shape[0], 3, *images.shape[1:3]), dtype=dtype)
        norm = _Normalizer(out)
        for i, image in enumerate(images):
            norm(i, image)
        return out
    scale, shift = _scale_shift(images.device)  # (3, 1, 1)
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W), channels-last strides
    return torch.addcmul(shift, x, scale).to(dtype).contiguous()


_SCALE_SHIFT: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _scale_shift(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) fp32 factors of `x * scale + shift` = (x / 255 - mean) / std, made once per
    device (a tensor from Python data on a GPU is a blocking host-to-device copy)."""
    device = torch.device(device)
    if device not in _SCALE_SHIFT:
        scale = torch.tensor([1.0 / (255.0 * s) for s in CLIP_STD], device=device).view(3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], device=device).view(3, 1, 1)
        _SCALE_SHIFT[device] = (scale, shift)
    return _SCALE_SHIFT[device]


# ------------------------------------------------------------------------- tokenisation
def ranks_per_node() -> int:
    """Processes sharing this node's cores: torchrun's LOCAL_WORLD_SIZE (1 when unset)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def host_threads(requested: int) -> int:
    """At most `requested` threads, and at most this process's share of the node's cores."""
    return max(1, min(requested, (os.cpu_count() or 1) // ranks_per_node()))


def cap_tokenizer_threads() -> None:
    """Give HF tokenizers' Rust thread pool (rayon, all cores per process by default) this
    process's share of the cores: RAYON_RS_NUM_CPUS, read when the pool first starts, unless
    the user set it. TOKENIZERS_PARALLELISM=false (serial encode_batch) is left as set."""
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(host_threads(os.cpu_count() or 1)))


def prepare_tokens(tokens: torch.Tensor, pin: bool) -> torch.Tensor:
    """Tokens as the model takes them: cut on the CPU to the batch's longest caption rounded
    up to a multiple of 16 (`clip_fast.model.trim_tokens`; the text tower reads no token
    value on the host), contiguous, in pinned memory when `pin` (asynchronous transfer)."""
    from clip_fast.model.clip import trim_tokens

    tokens = trim_tokens(tokens)
    return tokens.pin_memory() if pin else tokens.contiguous()


class TokenizeWorker:
    """Tokenises caption batches on one background thread, in submission order.

    `submit(captions)` returns a Future of `prepare_tokens(tokenize(captions), pin)`; a
    tokenizer exception is raised by the Future's `result()`. `close()` (also on exit from
    a `with` block) cancels what has not started and joins the thread. Callers keep the
    queue short (the DALI loader submits at most its prefetch depth + 1 batches ahead).
    """

    def __init__(self, tokenize: Callable[[list[str]], torch.Tensor], pin: bool) -> None:
        cap_tokenizer_threads()
        self.tokenize, self.pin = tokenize, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip_fast-tokenize")

    def _run(self, captions: list[str]) -> torch.Tensor:
        return prepare_tokens(self.tokenize(captions), self.pin)

    def submit(self, captions: list[str]) -> Future:
        return self._pool.submit(self._run, captions)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "TokenizeWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Normalizer:
    """Writes CLIP-normalised images into `out` (B, 3, S, S) one at a time, on CPU.

    Per image, the uint8 -> fp32 conversion and the multiply-add run on a (3, S, S) tile
    that stays in cache (600 KB at 224 px), and the batch-sized output is written once,
    instead of a batched permute / float / addcmul / contiguous chain that makes several
    passes over the whole batch (several times slower; docs/benchmarks.md).
    """

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out
        self.scale, self.shift = _scale_shift(out.device)
        # Non-fp32 outputs are computed in an fp32 staging tile, then cast.
        self.tmp = None if out.dtype == torch.float32 else torch.empty(out.shape[1:])

    def __call__(self, i: int, image: torch.Tensor) -> None:
        """out[i] = normalised `image`, uint8 (S, S, 3) (any strides)."""
        dst = self.out[i] if self.tmp is None else self.tmp
        dst.copy_(image.permute(2, 0, 1))  # uint8 (S, S, 3) -> fp32 (3, S, S)
        torch.addcmul(self.shift, dst, self.scale, out=dst)
        if self.tmp is not None:
            self.out[i].copy_(self.tmp)


class _ShardDataset(torch.utils.data.Dataset):
    """Map-style view over every indexed sample; reads with os.pread (no tar parsing)."""

    def __init__(self, shards: list[ShardIndex], image_size: int, train: bool, seed: int) -> None:
        self.paths = [s.path for s in shards]
        self.shard_of = np.concatenate([np.full(len(s), i, dtype=np.int32) for i, s in enumerate(shards)])
        self.offsets = np.concatenate([s.offsets for s in shards])  # (N, 4)
        self.image_size, self.train, self.seed, self.epoch = image_size, train, seed, 0
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # fresh descriptors in each worker process
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return os.pread(fd, size, offset)

    def load(self, i: int) -> tuple[np.ndarray, str]:
        from PIL import Image
        import io

        shard = int(self.shard_of[i])
        img_off, img_size, txt_off, txt_size = (int(v) for v in self.offsets[i])
        caption = self._read(shard, txt_off, txt_size).decode("utf-8")
        # Per-sample generator: crops depend on (seed, epoch, sample), not on which worker ran it.
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        with Image.open(io.BytesIO(self._read(shard, img_off, img_size))) as img:
            return pil_transform(img, self.image_size, self.train, rng), caption

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, int]:
        # A sample that fails now (its shard changed since indexing) is replaced by the
        # next one, so batches keep their size; failures are counted.
        for tries in range(len(self)):
            try:
                img, caption = self.load((i + tries) % len(self))
                return img, caption, tries
            except Exception as e:  # PIL/OS errors of every kind
                log.debug("sample %d failed to load: %s", (i + tries) % len(self), e)
        raise RuntimeError("no sample of the shard list could be decoded")


class _Collate:
    """Stack uint8 images, tokenise captions (in the worker); normalise when on CPU."""

    def __init__(self, tokenize: Callable, normalize_dtype: torch.dtype | None) -> None:
        self.tokenize, self.normalize_dtype = tokenize, normalize_dtype

    def __call__(self, batch):
        images = torch.from_numpy(np.stack([b[0] for b in batch]))  # (B, H, W, 3) uint8
        tokens = prepare_tokens(self.tokenize([b[1] for b in batch]), pin=False)  # the DataLoader pins
        if self.normalize_dtype is not None:
            images = normalize(images, self.normalize_dtype)
        return images, tokens, sum(b[2] for b in batch)


# ------------------------------------------------------------------------- loader classes
class ShardLoader:
    """Iterable over (images, tokens) batches; `len()` = batches per epoch on this rank."""

    backend = "base"

    def __init__(self, shards: list[ShardIndex], batch_size: int, image_size: int, tokenize: Callable,
                 train: bool, rank: int, world_size: int, device: torch.device, dtype: torch.dtype,
                 num_workers: int, seed: int, drop_last: bool, shuffle_buffer: int, *,
                 resampled_samples: int | None = None) -> None:
        self.shards = shards
        self.resampled_samples = resampled_samples  # samples per epoch (all ranks), drawn with replacement
        self.batch_size, self.image_size, self.tokenize, self.train = batch_size, image_size, tokenize, train
        self.rank, self.world_size, self.device, self.dtype = rank, world_size, device, dtype
        self.num_workers, self.seed, self.drop_last, self.shuffle_buffer = num_workers, seed, drop_last, shuffle_buffer
        self.epoch = 0
        self.start_batch = 0  # the next iteration starts at this batch of the epoch (resume)
        self.num_samples = sum(len(s) for s in shards)
        skipped: Counter = Counter()
        for s in shards:
            skipped.update(s.skipped)
        self.stats = LoaderStats(self.num_samples, 0, skipped)
        self.stats.rank_samples = self._plan(0)[2]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (shuffling and crops are a function of (seed, epoch, rank)).

        `start_batch` resumes mid-epoch: the next pass yields batches start_batch,
        start_batch + 1, ... of the epoch, equal to those of an uninterrupted pass, and the
        samples of the batches before it are neither read nor decoded. Without calls, each
        complete pass moves to the next epoch by itself (from batch 0)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not isinstance(start_batch, int) or isinstance(start_batch, bool) or not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be an int in [0, {len(self)}] (batches per epoch), got {start_batch!r}")
        self.epoch, self.start_batch = epoch, start_batch
        self.stats.rank_samples = self._plan(epoch)[2]

    def _plan(self, epoch: int) -> tuple[list[int], int, int]:
        """(shard order, first sample of this rank's slice, slice length) for `epoch`."""
        order = list(range(len(self.shards)))
        if self.train:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        order = [i for i in order if len(self.shards[i])]  # DALI rejects empty indexes
        if self.resampled_samples is not None:
            return order, 0, self.resampled_samples // self.world_size
        n, w, r = self.num_samples, self.world_size, self.rank
        start, stop = r * n // w, (r + 1) * n // w
        return order, start, stop - start

    def _resampled_indices(self, epoch: int, order: list[int], count: int) -> np.ndarray:
        """This rank's `count` sample positions (into the shards listed by `order`) for a
        resampled epoch: whole shards drawn uniformly with replacement, then permuted."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, 3])
        sizes = np.array([len(self.shards[i]) for i in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        drawn: list[np.ndarray] = []
        held = 0
        while held < count:
            j = int(rng.integers(len(order)))
            drawn.append(np.arange(starts[j], starts[j] + sizes[j]))
            held += int(sizes[j])
        positions = np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)
        return rng.permutation(positions)[:count]

    def __len__(self) -> int:
        if self.resampled_samples is not None:
            return (self.resampled_samples // self.world_size) // self.batch_size
        if self.drop_last:  # the same on every rank: the smallest slice is floor(N / W)
            return (self.num_samples // self.world_size) // self.batch_size
        return -(-self._plan(self.epoch)[2] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.start_batch
        yield from self._iterate(epoch, start)
        self.epoch, self.start_batch = epoch + 1, 0
        self.stats.rank_samples = self._plan(self.epoch)[2]

    def _sample_plan(self, epoch: int) -> tuple["_ShardDataset", list[list[int]]]:
        """The epoch's samples (a dataset over the shards in the epoch's order) and this
        rank's batches of sample numbers: its slice, permuted when training, cut into
        batches (`len(self)` of them)."""
        order, start, count = self._plan(epoch)
        dataset = _ShardDataset([self.shards[i] for i in order], self.image_size, self.train, self.seed)
        dataset.epoch = epoch
        if self.resampled_samples is not None:
            indices = self._resampled_indices(epoch, order, count)
        else:
            indices = np.arange(start, start + count)
            if self.train:
                np.random.default_rng([self.seed, epoch, self.rank, 1]).shuffle(indices)
        batches = [indices[i : i + self.batch_size].tolist() for i in range(0, count, self.batch_size)][: len(self)]
        return dataset, batches

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dataset, batches = self._sample_plan(epoch)
        batches = batches[start_batch:]  # a mid-epoch resume reads none of the batches before
        if batches:
            yield from self._load(dataset, batches)

    def _load(self, dataset: torch.utils.data.Dataset, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, tokens) on `self.device` for each batch of sample numbers of `dataset`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(samples={self.num_samples}, shards={len(self.shards)}, batch_size={self.batch_size}, "
                f"image_size={self.image_size}, train={self.train}, rank={self.rank}/{self.world_size}, device={self.device})")


class TorchShardLoader(ShardLoader):
    """torch DataLoader + PIL over the shard indexes (the fallback when DALI is missing)."""

    backend = "torch"

    def _load(self, dataset: torch.utils.data.Dataset, batches: list[list[int]]):
        on_cpu = self.device.type == "cpu"
        if self.num_workers > 0:
            # Workers are forked. Garbage that is still waiting for the cycle collector
            # (a DALI pipeline after the DALI fallback, say) must be freed here: freed
            # in a forked worker, a DALI pipeline's destructor waits forever on a lock
            # copied from this process.
            gc.collect()
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            # On CPU the workers normalise (parallel); for a GPU they ship uint8 (4x fewer
            # bytes over PCIe) and the GPU normalises.
            collate_fn=_Collate(self.tokenize, self.dtype if on_cpu else None),
            pin_memory=not on_cpu,
            prefetch_factor=4 if self.num_workers > 0 else None,
            timeout=600 if self.num_workers > 0 else 0,  # a dead worker raises, never hangs
        )
        for images, tokens, errors in loader:
            if errors:
                self.stats.decode_errors += errors
                log.warning("clip_fast.data: %d image(s)%s failed to decode and were replaced (%d so far)",
                            errors, self._source_note(), self.stats.decode_errors)
            images = images.to(self.device, non_blocking=True)
            if not on_cpu:
                images = normalize(images, self.dtype)
            yield images, tokens.to(self.device, non_blocking=True)

    def _source_note(self) -> str:
        """What a decode warning adds after "image(s)" to say where they came from."""
        return ""


class CsvLoader(TorchShardLoader):
    """torch DataLoader + PIL over the rows of a CSV file (see clip_fast.data.csv_dataset)."""

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

    def _sample_plan(self, epoch: int) -> tuple[CsvDataset, list[list[int]]]:
        """The epoch's dataset over the usable rows and this rank's batches of row numbers."""
        order, start, count = self._plan(epoch)
        rows = order[start : start + count]
        batches = [rows[i : i + self.batch_size].tolist() for i in range(0, count, self.batch_size)][: len(self)]
        return CsvDataset(self.rows, self.image_size, self.train, self.seed, epoch), batches

    def _source_note(self) -> str:
        return f" of {self.rows.path}"

    def __repr__(self) -> str:
        return (f"CsvLoader(path={self.rows.path!r}, samples={self.num_samples}, batch_size={self.batch_size}, "
                f"image_size={self.image_size}, train={self.train}, rank={self.rank}/{self.world_size}, device={self.device})")


@dataclass
class DaliOptions:
    """Settings of the DALI pipeline's JPEG decoder (None: DALI's default).

    hw_decoder_load: fraction of each batch given to the hardware JPEG decoder (A100,
        H100) on the 'mixed' device, the rest to nvJPEG's CUDA decoder.
    device_memory_padding, host_memory_padding: bytes added to each nvJPEG device / pinned
        host buffer allocation, so buffers grow rarely (DALI's default 16 MB / 8 MB).
    preallocate_width_hint, preallocate_height_hint: the image size the hardware decoder
        preallocates its buffers for.
    prefetch_queue_depth: batches DALI prepares ahead.
    """

    hw_decoder_load: float | None = None
    device_memory_padding: int | None = None
    host_memory_padding: int | None = None
    preallocate_width_hint: int | None = None
    preallocate_height_hint: int | None = None
    prefetch_queue_depth: int = 2

    def decoder_kwargs(self, device: str) -> dict:
        """Keyword arguments of fn.decoders.* for `device` ('mixed' takes all of them)."""
        if device != "mixed":
            return {}
        names = ("hw_decoder_load", "device_memory_padding", "host_memory_padding",
                 "preallocate_width_hint", "preallocate_height_hint")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class _DaliFeed:
    """The external source of the DALI pipeline: per batch of the epoch's sample plan, the
    encoded images (and for training each sample's crop window, drawn from (seed, epoch,
    sample) as the torch path draws it), read with pread. The batch's captions go to the
    tokenisation worker as the batch is fed; `pending` keeps (rows, tokens Future) in feed
    order, which is DALI's output order. `fed` counts the samples handed to the decoder."""

    def __init__(self, train: bool) -> None:
        self.train = train
        self.dataset: _ShardDataset | None = None
        self.batches: list[list[int]] = []
        self.tokens: TokenizeWorker | None = None
        self.pending: deque = deque()
        self.fed = 0

    def start(self, dataset: "_ShardDataset", batches: list[list[int]], tokens: TokenizeWorker) -> None:
        self.dataset, self.batches, self.tokens = dataset, batches, tokens
        self.pending.clear()

    def __iter__(self):  # DALI calls iter() for each pass (cycle="raise")
        for batch in self.batches:  # read at the first next(): the plan set by start()
            yield self._batch(batch)

    def _batch(self, batch: list[int]):
        from PIL import Image

        encoded, captions, windows = [], [], []
        for i in batch:
            shard = int(self.dataset.shard_of[i])
            img_off, img_size, txt_off, txt_size = (int(v) for v in self.dataset.offsets[i])
            data = self.dataset._read(shard, img_off, img_size)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            captions.append(self.dataset._read(shard, txt_off, txt_size).decode("utf-8"))
            if self.train:
                with Image.open(io.BytesIO(data)) as img:  # the header only
                    rng = np.random.default_rng([self.dataset.seed, self.dataset.epoch, i])
                    windows.append(random_resized_crop_box(img.width, img.height, rng))
        self.pending.append((len(batch), self.tokens.submit(captions)))
        self.fed += len(batch)
        if not self.train:
            return (encoded,)
        anchors = [np.array(w[:2], dtype=np.float32) for w in windows]  # (x, y)
        shapes = [np.array(w[2:], dtype=np.float32) for w in windows]  # (w, h)
        return encoded, anchors, shapes


class DaliShardLoader(ShardLoader):
    """DALI pipeline: JPEG decode on GPU ('mixed': nvJPEG + the hardware decoder) or on CPU
    threads (device_id=None), fed with the loader's own sample plan (the torch path's: the
    same order, the same training crop windows) through an external source.

    The pipeline is built once and reset between epochs; a mid-epoch resume
    (`set_epoch(epoch, start_batch)`) feeds only the batches from `start_batch` on. GPU
    outputs are produced on torch's current stream and handed over by DLPack, then copied
    into a torch-owned tensor on that stream. Captions are tokenised on a background
    thread (`TokenizeWorker`) while DALI decodes. DALI's CPU threads: `num_workers`, at
    most this rank's share of the node's cores (LOCAL_WORLD_SIZE).

    GPU: crop, resize and normalise run inside DALI too. CPU: DALI decodes (for training
    only the crop window: ROI decode), and the resample to S x S and the normalisation run
    in torch on the iterating thread, overlapped with DALI's threads decoding the next
    batches. DALI's CPU resampler costs several times its JPEG decode and about an order
    of magnitude more than torch's uint8 kernel with Pillow's filter (see `resize_uint8`),
    so a pipeline resampling in DALI is slower than PIL DataLoader workers
    (docs/benchmarks.md has the per-stage numbers; docs/design.md §7 the data path).
    """

    backend = "dali"

    def __init__(self, *args, options: DaliOptions | None = None) -> None:
        super().__init__(*args)
        self.options = options or DaliOptions()
        self.feed = _DaliFeed(self.train)
        self._pipe = None
        self._pipe_exhausted = False  # the last pass ended in StopIteration: reset() is enough

    def _out_type(self):
        from nvidia.dali import types

        # DALI has no bf16: produce fp16 (the normalised range is about [-2, 2.2], where fp16
        # is finer than bf16) and cast on the device.
        if self.dtype in (torch.float16, torch.bfloat16):
            return types.FLOAT16, torch.float16
        return types.FLOAT, torch.float32

    def build_pipeline(self):
        """The DALI pipeline over `self.feed` (built; fed when run)."""
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        on_cpu = self.device.type == "cpu"
        device_id = None if on_cpu else (self.device.index if self.device.index is not None else torch.cuda.current_device())
        seed = int(np.random.default_rng([self.seed, self.rank, 2]).integers(2**31 - 1))
        pipe = Pipeline(batch_size=self.batch_size, num_threads=host_threads(max(1, self.num_workers)),
                        device_id=device_id, seed=seed, prefetch_queue_depth=self.options.prefetch_queue_depth)
        decode_device = "cpu" if on_cpu else "mixed"
        hints = self.options.decoder_kwargs(decode_device)
        with pipe:
            if self.train:
                encoded, anchor, shape = fn.external_source(source=self.feed, num_outputs=3, batch=True, cycle="raise")
                # Decode only the crop window (ROI decode); resized to S x S below (GPU) or by torch (CPU).
                images = fn.decoders.image_slice(encoded, anchor, shape, device=decode_device, output_type=types.RGB,
                                                 normalized_anchor=False, normalized_shape=False, axis_names="WH", **hints)
            else:
                encoded, = fn.external_source(source=self.feed, num_outputs=1, batch=True, cycle="raise")
                images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **hints)
            if not on_cpu:
                images = self._gpu_transform(encoded, images)
            pipe.set_outputs(images)  # CPU: uint8 (h, w, 3) per sample, resampled in _cpu_batch
        pipe.build()
        return pipe

    def _gpu_transform(self, encoded, images):
        """DALI graph: decoded RGB -> S x S normalised CHW (`self._out_type()`)."""
        from nvidia.dali import fn, math as dmath, types

        s = self.image_size
        if self.train:
            images = fn.resize(images, resize_x=s, resize_y=s, interp_type=types.INTERP_CUBIC, antialias=True)
            crop_pos = [0.5, 0.5]  # already S x S
        else:
            # Output size computed like torchvision's Resize(int): shorter side -> S,
            # longer side -> floor(S * long / short).
            shape = fn.peek_image_shape(encoded)  # (H, W, C) from the header
            h, w = shape[0], shape[1]
            short = dmath.min(h, w)
            new_h, new_w = s * h // short, s * w // short
            images = fn.resize(
                images,
                resize_x=fn.cast(new_w, dtype=types.FLOAT),
                resize_y=fn.cast(new_h, dtype=types.FLOAT),
                interp_type=types.INTERP_CUBIC, antialias=True,
            )
            # Centre-crop offsets like torchvision: round((new - S) / 2) with Python's
            # round-half-to-even (DALI's own centring rounds halves up: a one-pixel
            # shift for odd margins). Passed as a relative position DALI maps back to
            # exactly this integer.
            crop_pos = [_half_even_half(new_h - s), _half_even_half(new_w - s)]
        return fn.crop_mirror_normalize(
            images, dtype=self._out_type()[0], output_layout="CHW", crop=(s, s),
            crop_pos_y=crop_pos[0], crop_pos_x=crop_pos[1],
            mean=[255 * m for m in CLIP_MEAN], std=[255 * v for v in CLIP_STD],
        )

    def _cpu_batch(self, images_dali, k: int) -> torch.Tensor:
        """First k decoded samples (uint8 HWC, varying sizes) -> normalised (k, 3, S, S).

        Each sample is resampled and normalised while it is in cache. torch runs
        single-threaded here: DALI's threads keep the cores busy decoding the next batches,
        and an OpenMP team whose second thread waits for a busy core makes these small ops
        several times slower.
        """
        s = self.image_size
        out = torch.empty((k, 3, s, s), dtype=self.dtype)
        norm = _Normalizer(out)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in range(k):
                # Zero-copy view of DALI's output buffer (valid until the next pipe.run()).
                x = torch.from_numpy(np.asarray(images_dali[i]))  # (h, w, 3) uint8
                if self.train:  # x is the random crop's window
                    x = resize_uint8(x, s, s)
                else:
                    nw, nh, left, top = eval_geometry(x.shape[1], x.shape[0], s)
                    if (nw, nh) != (x.shape[1], x.shape[0]):
                        x = resize_uint8(x, nw, nh)
                    x = x[top : top + s, left : left + s]
                norm(i, x)
        finally:
            torch.set_num_threads(threads)
        return out

    def _pipeline_for(self, dataset: "_ShardDataset", batches: list[list[int]], tokens: TokenizeWorker):
        """The pipeline, fed `batches` from its next pass on: built on first use, reset when
        the previous pass ran to its end, rebuilt after a pass abandoned midway (its
        prefetched batches would otherwise come out first)."""
        self.feed.start(dataset, batches, tokens)
        if self._pipe is not None and self._pipe_exhausted:
            self._pipe.reset()
        else:
            self._pipe = None  # drop an abandoned pipeline before building its successor
            self._pipe = self.build_pipeline()
        self._pipe_exhausted = False
        return self._pipe

    def _gpu_images(self, images_dali, rows: int) -> torch.Tensor:
        """DALI's GPU batch -> a torch-owned (rows, 3, S, S) tensor of `self.dtype`. The
        outputs were made ready on torch's current stream (pipe.run(stream)); the DLPack
        view keeps DALI's buffer alive until the copy enqueued here on that stream is
        done with it."""
        with torch.cuda.device(self.device):
            view = torch.from_dlpack(images_dali.as_tensor())
        return view[:rows].to(self.dtype, copy=True)

    def _load(self, dataset: _ShardDataset, batches: list[list[int]]):
        on_cpu = self.device.type == "cpu"
        with TokenizeWorker(self.tokenize, pin=not on_cpu and torch.cuda.is_available()) as tokens:
            pipe = self._pipeline_for(dataset, batches, tokens)
            stream = None if on_cpu else torch.cuda.current_stream(self.device)
            while True:
                try:
                    (images_dali,) = pipe.run() if stream is None else pipe.run(stream)
                except StopIteration:
                    self._pipe_exhausted = True
                    return
                except RuntimeError as e:
                    self._pipe = None
                    raise RuntimeError(
                        "DALI pipeline failed (a shard changed since it was indexed?). Re-index with "
                        "verify_images=True or use backend='torch', which skips undecodable images: " + str(e).split("\n")[0]
                    ) from e
                rows, batch_tokens = self.feed.pending.popleft()
                images = self._cpu_batch(images_dali, rows) if on_cpu else self._gpu_images(images_dali, rows)
                yield images, batch_tokens.result().to(self.device, non_blocking=True)

    def probe(self) -> None:
        """Build the pipeline and decode epoch 0's first batch (what a DALI install that
        imports but cannot run here fails on); the next pass starts afresh."""
        dataset, batches = self._sample_plan(0)
        with TokenizeWorker(self.tokenize, pin=False) as tokens:
            try:
                pipe = self._pipeline_for(dataset, batches[:1], tokens)
                pipe.run()
            finally:
                self._pipe = None
                self.feed.pending.clear()


def _half_even_half(margin):
    """DALI graph: relative crop position whose anchor is round_half_even(margin / 2)."""
    from nvidia.dali import fn, math as dmath, types

    half = margin // 2
    odd = margin - 2 * half
    # margin odd: halves tie between `half` and `half + 1`; round to the even one.
    anchor = half + odd * (half - 2 * (half // 2))
    return fn.cast(anchor, dtype=types.FLOAT) / fn.cast(dmath.max(margin, 1), dtype=types.FLOAT)


# ----------------------------------------------------------------------------- factory
def check_loader_args(*, batch_size: int, image_size: int, tokenize: Callable, rank: int, world_size: int,
                      device: str | torch.device, dtype: torch.dtype, num_workers: int) -> torch.device:
    """Validate the arguments every loader factory shares; returns `device` as a torch.device."""
    for name, value in (("batch_size", batch_size), ("image_size", image_size), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if not callable(tokenize):
        raise TypeError("tokenize must be callable: list[str] -> LongTensor (n, context_length)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {device}")
    return device


def build_loader(
    source: list[str] | str,
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
    shuffle_buffer: int = 1024,
    verify_images: bool | None = None,
    dali_options: DaliOptions | None = None,
    resampled_samples: int | None = None,
    csv: CsvColumns | None = None,
) -> ShardLoader:
    """Build a loader over webdataset shards (see the module docstring for the semantics)
    or, with `csv`, over one of open_clip's CSV files (see clip_fast.data.csv_dataset).

    Args:
        source: tar paths (a list, a glob, or 'dir/shard-{000000..000009}.tar'); with
            `csv`, the path of the CSV file.
        tokenize: captions -> (n, context_length) int64, e.g. a `Tokenizer`.
        backend: "auto" (DALI for a cuda device when installed and working, else torch),
            "dali" (also on CPU: device_id=None, decoding on CPU threads) or "torch".
        rank, world_size: this process's slice of every epoch.
        device, dtype: where and in which floating dtype images are returned.
        num_workers: DataLoader workers (torch) or DALI CPU threads.
        drop_last: defaults to `train`.
        shuffle_buffer: accepted for compatibility; both backends permute this rank's
            whole slice of the epoch.
        verify_images: see `shards.load_shard_index`.
        dali_options: decoder settings of the DALI backend (`DaliOptions`).
        resampled_samples: M = samples per epoch over all ranks, drawn by whole shards with
            replacement (see the module docstring); None: every sample once per epoch.
            Needs the torch backend ("auto" picks it).
        csv: the CSV file's columns and separator (open_clip's --csv-* flags); read by the
            torch backend ("auto" picks it; DALI reads webdataset shards only).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(shuffle_buffer, int) or isinstance(shuffle_buffer, bool) or shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be a positive int, got {shuffle_buffer!r}")
    device = check_loader_args(batch_size=batch_size, image_size=image_size, tokenize=tokenize, rank=rank,
                               world_size=world_size, device=device, dtype=dtype, num_workers=num_workers)
    drop_last = train if drop_last is None else drop_last
    if csv is not None:
        sources, what, nothing = _csv_rows(source, csv, backend, verify_images, resampled_samples, num_workers)
    else:
        paths = expand_shards(source)
        if not paths:
            raise ValueError("shards is empty: give at least one .tar shard")
        sources = load_shard_indexes(paths, verify_images=verify_images, num_threads=max(1, num_workers))
        what, nothing = f"sample(s) in {len(paths)} shard(s)", f"no readable samples in {len(paths)} shard(s)"
    total = sum(len(s) for s in sources)
    skipped: Counter = Counter()
    for s in sources:
        skipped.update(s.skipped)
    if skipped:
        log.warning("clip_fast.data: skipped %d %s: %s", sum(skipped.values()), what, dict(skipped))
    if total == 0:
        raise ValueError(f"{nothing} (skipped: {dict(skipped)})")
    if resampled_samples is not None:
        if not isinstance(resampled_samples, int) or resampled_samples // world_size < batch_size:
            raise ValueError(f"resampled_samples must be an int >= batch_size * world_size = "
                             f"{batch_size * world_size}, got {resampled_samples!r}")
        if backend == "dali":
            raise ValueError("resampled_samples needs backend 'torch' or 'auto' (DALI's reader samples without replacement)")
    elif drop_last and (total // world_size) // batch_size == 0:
        raise ValueError(
            f"batch_size={batch_size} is larger than this rank's share of the data "
            f"({total // world_size} samples = {total} / world_size {world_size}) with drop_last=True"
        )

    args = (sources, batch_size, image_size, tokenize, train, rank, world_size, device, dtype, num_workers, seed, drop_last, shuffle_buffer)
    if csv is not None:
        return CsvLoader(*args)
    if backend == "torch" or resampled_samples is not None:
        return TorchShardLoader(*args, resampled_samples=resampled_samples)
    if backend == "dali":
        if not dali_available():
            raise RuntimeError("backend='dali' but nvidia-dali is not installed (pip install nvidia-dali-cuda120)")
        return DaliShardLoader(*args, options=dali_options)
    if device.type == "cpu":
        # The torch path replaces and counts an image that fails to decode at run time
        # (a shard changed after indexing), where DALI stops with an error; DALI's CPU
        # pipeline is faster (docs/benchmarks.md) and backend="dali" selects it.
        return TorchShardLoader(*args)
    if not dali_available():
        warn_once("nvidia-dali is not installed: data loading uses the torch/PIL path")
        return TorchShardLoader(*args)
    return dali_or_torch(DaliShardLoader(*args, options=dali_options))


def _csv_rows(path: str, columns: CsvColumns, backend: str, verify_images: bool | None,
              resampled_samples: int | None, num_workers: int) -> tuple[list[CsvRows], str, str]:
    """build_loader's sources for a CSV file: [its usable rows], what a skipped one is, and
    the error when none is usable."""
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch' for a CSV file, got {backend!r} "
                         "(the DALI reader needs webdataset shards: python -m clip_fast.data.make_shards)")
    if resampled_samples is not None:
        raise ValueError("resampled_samples needs webdataset shards, not a CSV file")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"source must be one CSV file path with csv=..., got {path!r}")
    rows = read_csv_rows(os.fspath(path), columns, bool(verify_images), max(1, num_workers))
    return [rows], f"row(s) of {rows.path}", f"{rows.path}: no usable rows"


def dali_or_torch(loader: DaliShardLoader) -> ShardLoader:
    """`loader` when its pipeline builds and decodes a first batch, else (with a warning)
    the torch/PIL loader of the same arguments: a DALI that imports but cannot run here
    (driver, libraries, a decoder failing at run time) must not stop training."""
    try:
        loader.probe()
    except Exception as e:
        warn_once(f"DALI pipeline could not run ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                  "using the torch/PIL path")
        return TorchShardLoader(loader.shards, loader.batch_size, loader.image_size, loader.tokenize, loader.train,
                                loader.rank, loader.world_size, loader.device, loader.dtype, loader.num_workers,
                                loader.seed, loader.drop_last, loader.shuffle_buffer)
    return loader
