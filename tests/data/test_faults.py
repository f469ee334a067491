"""Data faults: 16-bit PNGs, truncated and unreadable shards, index/manifest permissions,
captions without an image."""
import io
import logging
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clip_fast.data.images import pil_transform
from clip_fast.data.loader import build_loader, dali_available, normalize
from clip_fast.data.make_shards import format_summary, make_shards
from clip_fast.data.shards import MANIFEST_NAME, ShardWriter, load_shard_indexes, read_index
from tests.support.shard_samples import write_tar

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed"))]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_FAST_CACHE", str(tmp_path / "cache"))


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit RGB): (H, W) grey or (H, W, 3) RGB."""
    arr = values[..., None] if values.ndim == 2 else values
    h, w, c = arr.shape
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def sixteen_bit_image(channels: int, size: int = 32) -> np.ndarray:
    """Smooth 16-bit content over the whole range (most values > 255: clipping makes them white)."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    planes = [x * 65535, y * 65535, (1 - x * y) * 65535][:channels]
    image = np.stack(planes, -1).round().astype(np.uint16)
    return image[..., 0] if channels == 1 else image


def expected_rgb8(values: np.ndarray) -> np.ndarray:
    """The 8-bit RGB image: the high byte of every 16-bit value, grey replicated."""
    high = (values >> 8).astype(np.uint8)
    return np.repeat(high[..., None], 3, -1) if high.ndim == 2 else high


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_pil_transform(channels):
    values = sixteen_bit_image(channels)
    expected = expected_rgb8(values)
    assert expected.mean() < 200  # white would be 255 everywhere
    with Image.open(io.BytesIO(png16(values))) as img:
        out = pil_transform(img, image_size=32, train=False)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_png_loader(tmp_path, backend):
    grey, rgb = sixteen_bit_image(1), sixteen_bit_image(3)
    write_tar(tmp_path / "s.tar", [("a.png", png16(grey)), ("a.txt", b"grey 0"), ("b.png", png16(rgb)), ("b.txt", b"rgb 1")])
    loader = build_loader([str(tmp_path / "s.tar")], batch_size=2, image_size=32, train=False, backend=backend, num_workers=1,
                          tokenize=lambda caps: torch.tensor([[int(c.split()[-1])] for c in caps]))
    images, tokens = next(iter(loader))
    expected = normalize(torch.from_numpy(np.stack([expected_rgb8(grey), expected_rgb8(rgb)])))[tokens[:, 0]]
    # DALI reduces 16 -> 8 bits by its own rounding: at most one 8-bit level apart.
    tol = 0.0 if backend == "torch" else 1.01 / (255 * 0.2613)
    torch.testing.assert_close(images, expected, rtol=0, atol=tol + 1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_make_shards(tmp_path, channels):
    values = sixteen_bit_image(channels, size=48)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(png16(values))
    (tmp_path / "src" / "a.txt").write_text("a sixteen-bit picture")
    summary = make_shards(tmp_path / "src", tmp_path / "out", quality=100, progress=False)
    assert summary["written"] == 1
    (img_entry, _), = read_index(tmp_path / "out" / "shard-000000.idx")
    data = (tmp_path / "out" / "shard-000000.tar").read_bytes()[img_entry[1] : img_entry[1] + img_entry[2]]
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    # Re-encoded as a quality-100 JPEG of a smooth image: a few levels of DCT/colour
    # rounding at most, against 100+ levels for the white (clipped) image.
    diff = np.abs(decoded - expected_rgb8(values))
    assert diff.mean() < 1.0 and diff.max() <= 6


# ----------------------------------------------------------------------- truncated shards
@pytest.fixture
def written_shards(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "w", shard_size=10) as w:
        for i in range(30):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
            w.write(buf.getvalue(), f"sample {i}")
    return sorted((tmp_path / "w").glob("*.tar"))


def test_truncated_shard_reports_real_loss_and_path(written_shards, caplog):
    cut = written_shards[1]
    data = cut.read_bytes()
    size = len(data) * 2 // 5 + 300  # inside a member
    cut.write_bytes(data[:size])
    listed = read_index(cut.with_suffix(".idx"))
    beyond = sum(1 for comps in listed if any(off + n > size for _, off, n, _ in comps))
    with caplog.at_level(logging.WARNING, logger="clip_fast.data"):
        indexes = load_shard_indexes([str(p) for p in written_shards])
    kept = len(indexes[1])
    assert 0 < kept < 10 and indexes[1].skipped == {"truncated_shard": 10 - kept}
    assert beyond == 10 - kept  # every sample of the index is either kept or counted lost
    assert [len(i) for i in (indexes[0], indexes[2])] == [10, 10]
    assert f"{cut}: truncated at {size} bytes; {10 - kept} of the 10 samples in {cut.with_suffix('.idx').name} lost" in caplog.text


def test_truncated_foreign_tar_without_index(tmp_path, caplog):
    jpg = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(jpg, format="JPEG")
    write_tar(tmp_path / "f.tar", [m for i in range(6) for m in ((f"{i}.jpg", jpg.getvalue()), (f"{i}.txt", b"x"))])
    data = (tmp_path / "f.tar").read_bytes()
    (tmp_path / "f.tar").write_bytes(data[: len(data) // 2 + 100])
    with caplog.at_level(logging.WARNING, logger="clip_fast.data"):
        (index,) = load_shard_indexes([str(tmp_path / "f.tar")])
    assert index.skipped == {"truncated_shard": 1}  # the cut sample is not also a "missing caption"
    assert f"{tmp_path / 'f.tar'}: truncated at" in caplog.text and "at least 1 sample lost" in caplog.text


# ---------------------------------------------------------------------- unreadable shards
def test_zero_byte_and_unreadable_shards_are_skipped_and_counted(written_shards, tmp_path, monkeypatch, caplog):
    empty, text, locked = tmp_path / "empty.tar", tmp_path / "text.tar", tmp_path / "locked.tar"
    empty.write_bytes(b"")
    text.write_text("this is not a tar file " * 100)
    locked.write_bytes(written_shards[0].read_bytes())
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    paths = [str(empty), str(written_shards[0]), str(text), str(locked), str(written_shards[2])]
    with caplog.at_level(logging.WARNING, logger="clip_fast.data"):
        loader = build_loader(paths, batch_size=4, image_size=16, train=False, backend="torch", num_workers=0,
                              tokenize=lambda caps: torch.tensor([[int(c.split()[-1])] for c in caps]))
    assert loader.stats.skipped == {"unreadable_shard": 3} and loader.stats.samples == 20
    ids = sorted(i for _, t in loader for i in t[:, 0].tolist())
    assert ids == list(range(10)) + list(range(20, 30))
    for path, why in ((empty, "zero bytes"), (text, "not a readable tar file"), (locked, "no read permission")):
        assert f"{path}: unreadable shard skipped ({why})" in caplog.text
    with pytest.raises(ValueError, match="none of the 2 shard\\(s\\) can be read: .*empty.tar.*zero bytes"):
        build_loader([str(empty), str(text)], batch_size=4, image_size=16, tokenize=lambda c: c)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_shard_without_read_permission(written_shards):
    os.chmod(written_shards[0], 0)
    try:
        indexes = load_shard_indexes([str(p) for p in written_shards])
    finally:
        os.chmod(written_shards[0], 0o644)
    assert indexes[0].skipped == {"unreadable_shard": 1} and [len(i) for i in indexes] == [0, 10, 10]


# ------------------------------------------------------------------- make_shards outputs
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_index_and_manifest_have_the_tars_permissions(tmp_path, umask):
    (tmp_path / "src").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "a.jpg")
    (tmp_path / "src" / "a.txt").write_text("a caption")
    old = os.umask(umask)
    try:
        make_shards(tmp_path / "src", tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {"shard-000000.tar": 0o666 & ~umask, "shard-000000.idx": 0o666 & ~umask, MANIFEST_NAME: 0o666 & ~umask}


def test_captions_without_image_are_reported(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(src / "a.jpg")
    (src / "a.txt").write_text("a caption")
    for name in ("orphan.txt", "sub/lonely.txt", "sub/x.txt"):
        (src / name).write_text("a caption without its image")
    Image.new("RGB", (8, 8)).save(src / "sub" / "y.png")  # a different stem: x.txt has no image
    summary = make_shards(src, tmp_path / "out", progress=False)
    assert summary["written"] == 1
    assert summary["skipped"] == {"missing_image": 3, "missing_caption": 1}
    assert sorted(summary["examples"]["missing_image"]) == sorted(str(src / n) for n in ("orphan.txt", "sub/lonely.txt", "sub/x.txt"))
    text = format_summary(summary, tmp_path / "out")
    assert "missing_image: 3  e.g." in text and "orphan.txt" in text
