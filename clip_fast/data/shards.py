"""Webdataset tar shards and their DALI index files: write, index, validate.

A shard is a plain tar of samples `KEY.jpg` + `KEY.txt` stored next to each other.
Next to `NAME.tar` lives `NAME.idx`, DALI's text index for `fn.readers.webdataset`:

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> [<ext> <offset> <size> <name> ...]   # one line per sample

The index lets both backends jump straight to each sample (DALI shards the sample list
across ranks with it; the torch path reads samples with `os.pread`), and it is also how
bad samples are skipped: an index lists only the samples that passed validation, so a
corrupt JPEG is never handed to a decoder (DALI's decoders abort the whole pipeline on
one bad image; they have no skip-on-error mode).

Shards written by `ShardWriter` (`make_shards`, the demo dataset) come with a manifest,
`clip_fast_shards.json`, recording every shard's size: its indexes were built from images
that decoded, so they are trusted as they are. Any other tar is scanned once (tar headers,
captions, a reduced-size decode of each image), and the filtered index is cached under
`$CLIP_FAST_CACHE/index` (default ~/.cache/clip_fast/index), keyed by path, size and mtime. Under torch.distributed, `load_shard_indexes_distributed`
splits that work across the ranks (each shard scanned once) before they meet.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INDEX_VERSION = "v1.2"
MANIFEST_NAME = "clip_fast_shards.json"
_MANIFEST_FORMAT = "clip_fast.shards/1"
# Extensions accepted as the image of a sample, in order of preference. DALI's reader
# takes the same list as "jpg;jpeg;png;webp" (one output, any of these extensions).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
# Why a sample was skipped (keys of the skip counters, also used by make_shards).
# truncated_shard counts the samples a cut tar lost (those its DALI index lists beyond
# the cut; without an index, 1: at least the sample that was cut); unreadable_shard
# counts whole shards that could not be read (zero bytes, no permission, not a tar).
SKIP_REASONS = (
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_caption_encoding",
    "corrupt_image",
    "truncated_shard",
    "unreadable_shard",
)
log = logging.getLogger("clip_fast.data")


def cache_root() -> Path:
    """$CLIP_FAST_CACHE or ~/.cache/clip_fast: demo data and scanned shard indexes."""
    env = os.environ.get("CLIP_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clip_fast"


# --------------------------------------------------------------------------- index files
def write_index(path: str | os.PathLike, samples: list[list[tuple[str, int, int, str]]]) -> None:
    """Write a DALI webdataset index: one line per sample of (ext, data offset, size, name)."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for components in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in components))
    _atomic_write_text(Path(path), "\n".join(lines) + "\n")


def read_index(path: str | os.PathLike) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI webdataset index (the inverse of `write_index`)."""
    text = Path(path).read_text(encoding="utf-8").split("\n")
    header = text[0].split()
    if len(header) != 2 or not header[0].startswith("v1"):
        raise ValueError(f"{path}: not a DALI webdataset index (first line {text[0]!r})")
    samples = []
    for line in text[1:]:
        fields = line.split()
        if not fields:
            continue
        if len(fields) % 4:
            raise ValueError(f"{path}: malformed index line {line!r}")
        samples.append(
            [(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)]
        )
    if len(samples) != int(header[1]):
        raise ValueError(f"{path}: header says {header[1]} samples, found {len(samples)}")
    return samples


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file + rename: concurrent ranks never see a partial file.
    The file gets the permissions of any new file (0666 less the umask), like the tars."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ writing
class ShardWriter:
    """Write samples into `OUT/{prefix}-NNNNNN.tar` shards + DALI indexes + a manifest.

    The caller validates samples first (the manifest vouches for every one of them):

        with ShardWriter(out, shard_size=10000) as w:
            w.write(jpeg_bytes, "a caption")
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 10000, prefix: str = "shard") -> None:
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.prefix = prefix
        self.shards: list[dict] = []
        self.num_samples = 0
        self._tar: tarfile.TarFile | None = None
        self._entries: list[list[tuple[str, int, int, str]]] = []

    def _member(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # byte-identical shards for identical inputs
        header = info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors)
        offset = self._tar.offset + len(header)  # data starts right after the header
        self._tar.addfile(info, io.BytesIO(data))
        return offset, len(data)

    def write(self, image: bytes, caption: str, image_ext: str = "jpg") -> None:
        if self._tar is None:
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
            self._entries = []
            self.shards.append({"tar": name, "idx": name[:-4] + ".idx"})
        key = f"{self.num_samples:09d}"  # no dots: webdataset splits key and ext at the first dot
        img_off, img_size = self._member(f"{key}.{image_ext}", image)
        txt_off, txt_size = self._member(f"{key}.{CAPTION_EXT}", caption.encode("utf-8"))
        self._entries.append(
            [(image_ext, img_off, img_size, f"{key}.{image_ext}"), (CAPTION_EXT, txt_off, txt_size, f"{key}.{CAPTION_EXT}")]
        )
        self.num_samples += 1
        if len(self._entries) == self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._tar.close()
        self._tar = None
        meta = self.shards[-1]
        write_index(self.out_dir / meta["idx"], self._entries)
        meta["samples"] = len(self._entries)
        meta["bytes"] = os.path.getsize(self.out_dir / meta["tar"])

    def close(self) -> list[str]:
        """Finish the last shard, write the manifest; returns the shard paths."""
        if self._tar is not None:
            self._finish_shard()
        manifest = {"format": _MANIFEST_FORMAT, "shards": self.shards}
        _atomic_write_text(self.out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1))
        return [str(self.out_dir / s["tar"]) for s in self.shards]

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- reading
@dataclass
class ShardIndex:
    """The readable samples of one tar shard.

    `offsets` is (n, 4) int64: image data offset, image size, caption offset, caption size.
    `index_path` is a DALI index listing exactly these samples, in this order ("" for a
    shard that could not be read). `problems`: one line per fault found, naming the shard.
    """

    path: str
    index_path: str
    offsets: np.ndarray
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets)


def check_image_bytes(data: bytes) -> bool:
    """True when `data` decodes as an image. JPEGs decode at 1/8 scale (DCT scaling), which
    still walks the whole entropy-coded stream, so truncation and bad markers are caught
    at a fraction of a full decode's cost."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return False


def _split_name(name: str) -> tuple[str, str]:
    """Webdataset convention: key is everything before the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def scan_shard(path: str | os.PathLike, verify_images: bool = True) -> tuple[list[list[tuple[str, int, int, str]]], Counter]:
    """Read a tar shard once; return index entries for its good samples and skip counts.

    A sample needs one image (IMAGE_EXTS) and a non-empty UTF-8 caption; with
    `verify_images` its image must also decode. A tar that ends mid-member keeps the
    samples that lie entirely inside the file.
    """
    path = str(path)
    size = os.path.getsize(path)
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    skipped: Counter = Counter()
    end = 0  # where the last complete member's data (padded to 512-byte blocks) ends
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf:
                    if m.offset_data + m.size > size:
                        break  # cut inside this member's data
                    end = m.offset_data + -(-m.size // 512) * 512
                    if not m.isfile():
                        continue
                    key, ext = _split_name(m.name)
                    if not key or key.endswith("/") or os.path.basename(key).startswith("."):
                        continue
                    if not groups or groups[-1][0] != key:
                        groups.append((key, {}))
                    groups[-1][1].setdefault(ext, m)
        except (tarfile.ReadError, EOFError, OSError):
            if not groups:
                raise ValueError(f"{path}: not a readable tar file") from None
        # A complete tar ends with zero blocks after its last member; tarfile stops quietly
        # at the end of a file cut anywhere, so check for them.
        tail = os.pread(f.fileno(), 512, end)
        if len(tail) < 512 or any(tail):
            skipped["truncated_shard"] += 1
            if groups and _incomplete(groups[-1][1]):
                groups.pop()  # the sample the cut went through: counted as truncated
        entries = []
        for key, comps in groups:
            img = next((comps[e] for e in IMAGE_EXTS if e in comps), None)
            txt = comps.get(CAPTION_EXT)
            if img is None:
                skipped["missing_image"] += 1
                continue
            if txt is None:
                skipped["missing_caption"] += 1
                continue
            try:
                caption = os.pread(f.fileno(), txt.size, txt.offset_data).decode("utf-8")
            except UnicodeDecodeError:
                skipped["bad_caption_encoding"] += 1
                continue
            if not caption.strip():
                skipped["empty_caption"] += 1
                continue
            if verify_images and not check_image_bytes(os.pread(f.fileno(), img.size, img.offset_data)):
                skipped["corrupt_image"] += 1
                continue
            img_ext = _split_name(img.name)[1]
            entries.append(
                [(img_ext, img.offset_data, img.size, img.name), (CAPTION_EXT, txt.offset_data, txt.size, txt.name)]
            )
    return entries, skipped


def _incomplete(components: dict[str, tarfile.TarInfo]) -> bool:
    return CAPTION_EXT not in components or not any(e in components for e in IMAGE_EXTS)


def _truncation_loss(path: Path, kept: int) -> tuple[int | None, str]:
    """(samples lost, problem line) of a truncated shard: the samples its own DALI index
    (NAME.idx next to it, as make_shards writes) lists with data past the end of the file;
    (None, ...) without a readable index."""
    size = path.stat().st_size
    idx = path.with_suffix(".idx")
    try:
        listed = read_index(idx)
    except (OSError, ValueError):
        return None, f"{path}: truncated at {size} bytes; at least 1 sample lost ({kept} kept; no index {idx.name} to count the others)"
    lost = sum(1 for comps in listed if any(off + n > size for _, off, n, _ in comps))
    return lost, f"{path}: truncated at {size} bytes; {lost} of the {len(listed)} samples in {idx.name} lost ({kept} kept)"


def _trusted_index(path: Path) -> Path | None:
    """The index of a shard written by ShardWriter, if its manifest vouches for this file."""
    manifest = path.parent / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("format") != _MANIFEST_FORMAT:
        return None
    for shard in meta.get("shards", []):
        if shard.get("tar") == path.name and shard.get("bytes") == path.stat().st_size:
            idx = path.parent / shard["idx"]
            return idx if idx.is_file() else None
    return None


def _offsets(entries: list[list[tuple[str, int, int, str]]]) -> np.ndarray:
    """(n, 4) int64 offsets from index entries whose first component is the image."""
    out = np.empty((len(entries), 4), dtype=np.int64)
    for i, (img, txt) in enumerate(entries):
        out[i] = (img[1], img[2], txt[1], txt[2])
    return out


def load_shard_index(path: str | os.PathLike, verify_images: bool | None = None) -> ShardIndex:
    """Index one shard: the trusted ShardWriter index, else a cached scan of the tar.

    verify_images: None (default) decodes-checks images of shards that have no trusted
    index; True re-scans and decode-checks every shard; False checks only structure and
    captions (faster scan; a corrupt image would then abort a DALI pipeline).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"shard not found or not a file: {p}")
    if not os.access(p, os.R_OK):
        return _unreadable(p, "no read permission")
    if p.stat().st_size == 0:
        return _unreadable(p, "zero bytes")
    if verify_images is not True:
        idx = _trusted_index(p)
        if idx is not None:
            entries = read_index(idx)
            if all(len(e) == 2 and e[0][0] in IMAGE_EXTS and e[1][0] == CAPTION_EXT for e in entries):
                return ShardIndex(str(p), str(idx), _offsets(entries))
    verify = verify_images is not False
    st = p.stat()
    key = hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:20]
    stem = cache_root() / "index" / f"{p.stem}-{key}-{st.st_size}-{st.st_mtime_ns}-{'v' if verify else 's'}"
    idx, meta = stem.with_suffix(".idx"), stem.with_suffix(".json")
    if idx.is_file() and meta.is_file():
        try:
            cached = json.loads(meta.read_text())
            return ShardIndex(str(p), str(idx), _offsets(read_index(idx)), Counter(cached["skipped"]), cached["problems"])
        except (ValueError, KeyError, TypeError):  # a damaged or older cache entry: scan again
            pass
    try:
        entries, skipped = scan_shard(p, verify_images=verify)
    except (ValueError, OSError) as e:
        return _unreadable(p, str(e).removeprefix(f"{p}: "))
    problems = []
    if skipped["truncated_shard"]:
        lost, line = _truncation_loss(p, len(entries))
        skipped["truncated_shard"] = lost if lost is not None else skipped["truncated_shard"]
        problems.append(line)
    write_index(idx, entries)
    _atomic_write_text(meta, json.dumps({"skipped": dict(skipped), "problems": problems}))
    return ShardIndex(str(p), str(idx), _offsets(entries), skipped, problems)


def _unreadable(path: Path, why: str) -> ShardIndex:
    """The index of a shard that cannot be read: no samples, counted as unreadable_shard."""
    return ShardIndex(str(path), "", np.empty((0, 4), dtype=np.int64), Counter(unreadable_shard=1),
                      [f"{path}: unreadable shard skipped ({why})"])


def _index_in_threads(paths: list[str], verify_images: bool | None, num_threads: int) -> list[ShardIndex]:
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        return list(pool.map(lambda p: load_shard_index(p, verify_images), paths))


def load_shard_indexes(paths: list[str], verify_images: bool | None = None, num_threads: int = 4) -> list[ShardIndex]:
    """Index many shards in parallel (scans decode images; PIL releases the GIL). Each
    shard's problems are logged as warnings; ValueError when no shard can be read."""
    indexes = _index_in_threads(paths, verify_images, num_threads)
    for index in indexes:
        for line in index.problems:
            log.warning("clip_fast.data: %s", line)
    unreadable = [i for i in indexes if i.skipped["unreadable_shard"]]
    if indexes and len(unreadable) == len(indexes):
        shown = "; ".join(i.problems[0] for i in unreadable[:3])
        raise ValueError(f"none of the {len(indexes)} shard(s) can be read: {shown}")
    return indexes


def load_shard_indexes_distributed(paths: list[str], verify_images: bool | None = None, num_threads: int = 4,
                                   group=None) -> list[ShardIndex]:
    """`load_shard_indexes` on every rank of a torch.distributed group, each shard indexed once.

    Rank r of W indexes (scans, decode-checks, caches under `cache_root()`) the shards
    paths[r::W]; the ranks meet in one all_gather_object of their errors (every rank raises
    if one failed, none is left waiting); then each rank loads every index, from the cache
    (a cache folder on a shared file system or the same node) or, where another rank's
    cache is not visible, by its own scan of that shard. A last all_gather_object of a
    digest of the indexes checks that all ranks see the same samples. Without an
    initialised group of more than one rank it is `load_shard_indexes`. Every rank of the
    group must call it with the same `paths`.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return load_shard_indexes(paths, verify_images, num_threads)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    try:
        _index_in_threads(list(paths)[rank::world], verify_images, num_threads)
        error = None
    except Exception as e:  # shared with the other ranks, raised everywhere below
        error = f"{type(e).__name__}: {e}"
    errors: list = [None] * world
    dist.all_gather_object(errors, error, group=group)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise RuntimeError(f"indexing shards failed on rank {failed[0][0]}: {failed[0][1]}")
    indexes = load_shard_indexes(paths, verify_images, num_threads)
    digests: list = [None] * world
    dist.all_gather_object(digests, indexes_digest(indexes), group=group)
    if len(set(digests)) != 1:
        raise RuntimeError("ranks see different shard indexes (a shard changed while it was indexed?): "
                           f"digests {digests}")
    return indexes


def indexes_digest(indexes: list[ShardIndex]) -> str:
    """SHA-1 of the shard paths, sample offsets and skip counts: equal for equal indexes."""
    h = hashlib.sha1()
    for index in indexes:
        h.update(index.path.encode() + b"\0" + np.ascontiguousarray(index.offsets, dtype=np.int64).tobytes())
        h.update(json.dumps(sorted(index.skipped.items())).encode())
    return h.hexdigest()


def expand_shards(spec: str | os.PathLike | list) -> list[str]:
    """Shard list from a list of paths, a glob, braces ('data/shard-{000000..000009}.tar'),
    or a folder (its *.tar files, e.g. a make_shards output folder)."""
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for s in spec:
            out.extend(expand_shards(s))
        return out
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"shards must be a path, a pattern or a list of them, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        tars = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
        if not tars:
            raise FileNotFoundError(f"no .tar shard in folder {spec!r}")
        return tars
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo)
        return [
            p for i in range(int(lo), int(hi) + 1) for p in expand_shards(spec[: m.start()] + str(i).zfill(width) + spec[m.end() :])
        ]
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(spec))
        if not matches:
            raise FileNotFoundError(f"no shard matches {spec!r}")
        return matches
    return [spec]
