"""make_shards (folder and CSV sources, validation, summary), the shard/index format, and
the built-in demo dataset."""
import csv
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from clip_fast.data.demo import HELDOUT, ensure_demo_dataset
from clip_fast.data.make_shards import main as make_shards_main
from clip_fast.data.shards import MANIFEST_NAME, load_shard_index, read_index, scan_shard
from tests.support.processes import run_python


def _image(rng, mode="RGB", size=(40, 30)):
    arr = rng.integers(0, 256, size=(size[1], size[0], len(mode) if mode != "L" else 1), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode)


@pytest.fixture
def folder_source(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    good = {}
    for i, (fmt, mode) in enumerate([("jpg", "RGB"), ("png", "RGBA"), ("jpg", "L"), ("webp", "RGB"), ("bmp", "RGB"),
                                     ("jpg", "CMYK"), ("png", "P"), ("jpeg", "RGB")]):
        folder = src / ("sub/deeper" if i % 3 == 0 else "sub" if i % 3 == 1 else "")
        img = _image(rng, "RGB" if mode == "P" else mode)
        if mode == "P":
            img = img.convert("P")
        img.save(folder / f"img{i}.{fmt}")
        (folder / f"img{i}.txt").write_text(f"  caption number {i}\n", encoding="utf-8")
        good[f"caption number {i}"] = (fmt, mode)
    _image(rng).save(src / "nocaption.jpg")
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    (src / "corrupt.txt").write_text("corrupt")
    buf = io.BytesIO()
    _image(rng, size=(200, 200)).save(buf, format="JPEG")
    (src / "truncated.jpg").write_bytes(buf.getvalue()[:600])
    (src / "truncated.txt").write_text("truncated")
    _image(rng).save(src / "empty.jpg")
    (src / "empty.txt").write_text(" \n\t")
    _image(rng).save(src / "latin1.jpg")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "notes.md").write_text("not an image")
    return src, good


def _read_shards(out):
    samples = {}
    for tar in sorted(out.glob("*.tar")):
        index = read_index(tar.with_suffix(".idx"))
        with tarfile.open(tar) as tf:
            members = {m.name: m for m in tf.getmembers()}
            assert len(members) == 2 * len(index)
            data = open(tar, "rb").read()
            for (img_ext, img_off, img_size, img_name), (txt_ext, txt_off, txt_size, txt_name) in index:
                # The index points at the member data DALI and the torch path will read.
                assert (img_ext, txt_ext) == ("jpg", "txt")
                assert members[img_name].offset_data == img_off and members[img_name].size == img_size
                assert members[txt_name].offset_data == txt_off
                caption = data[txt_off : txt_off + txt_size].decode("utf-8")
                img = Image.open(io.BytesIO(data[img_off : img_off + img_size]))
                img.load()
                samples[caption] = img
    return samples


def test_make_shards_from_folder(folder_source, tmp_path):
    src, good = folder_source
    out = tmp_path / "out"
    proc = run_python(["-m", "clip_fast.data.make_shards", str(src), str(out), "--shard-size", "3"])
    assert proc.returncode == 0, proc.stderr
    assert "wrote 8 samples in 3 shard(s)" in proc.stdout
    for reason in ("missing_caption: 1", "corrupt_image: 2", "empty_caption: 1", "bad_caption_encoding: 1"):
        assert reason in proc.stdout
    assert "nocaption.jpg" in proc.stdout and "[make_shards]" in proc.stderr  # examples, progress
    samples = _read_shards(out)
    assert set(samples) == set(good)  # captions stripped, every good input once
    for caption, img in samples.items():
        assert img.format == "JPEG" and img.mode in ("RGB", "L") and img.size == (40, 30)
        assert (img.mode == "L") == (good[caption][1] == "L")  # greyscale JPEG kept as it is
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 2]
    # Trusted: the loader uses the written index without scanning.
    shard = load_shard_index(out / "shard-000000.tar")
    assert shard.index_path == str(out / "shard-000000.idx") and len(shard) == 3
    # And a scan of the same tar agrees with it.
    assert [e[0][1] for e in scan_shard(out / "shard-000000.tar")[0]] == shard.offsets[:, 0].tolist()


def test_make_shards_deterministic_and_ordered(folder_source, tmp_path):
    src, _ = folder_source
    assert make_shards_main([str(src), str(tmp_path / "a"), "--quiet"]) == 0
    assert make_shards_main([str(src), str(tmp_path / "b"), "--quiet"]) == 0
    assert make_shards_main([str(src), str(tmp_path / "c"), "--quiet", "--no-shuffle"]) == 0
    a, b, c = ((tmp_path / d / "shard-000000.tar").read_bytes() for d in "abc")
    assert a == b and a != c


def test_make_shards_from_csv(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(5):
        _image(rng).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"path": f"imgs/{i}.png", "text": f"a csv caption, with a comma {i}"})
    rows.append({"path": "imgs/missing.png", "text": "gone"})
    rows.append({"path": str(tmp_path / "imgs" / "0.png"), "text": ""})  # absolute path, empty caption
    with open(tmp_path / "data.tsv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "text"], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    code = make_shards_main([str(tmp_path / "data.tsv"), str(out), "--csv-img-key", "path", "--csv-caption-key", "text", "--quiet"])
    assert code == 0
    assert set(_read_shards(out)) == {f"a csv caption, with a comma {i}" for i in range(5)}
    # Default column names are open_clip's; a wrong one is a clear error.
    proc = run_python(["-m", "clip_fast.data.make_shards", str(tmp_path / "data.tsv"), str(tmp_path / "o2")])
    assert proc.returncode == 2 and "no column 'filepath'" in proc.stderr and "--csv-img-key" in proc.stderr


def test_make_shards_bad_source(tmp_path):
    proc = run_python(["-m", "clip_fast.data.make_shards", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert proc.returncode == 2 and "SRC not found" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_python(["-m", "clip_fast.data.make_shards", str(tmp_path / "empty"), str(tmp_path / "out"), "--shard-size", "0"])
    assert proc.returncode == 2 and "--shard-size" in proc.stderr
    assert make_shards_main([str(tmp_path / "empty"), str(tmp_path / "out"), "--quiet"]) == 1  # nothing written


def test_demo_dataset(tmp_path):
    kwargs = dict(image_size=32, num_train=300, num_val=50, num_zeroshot_per_class=3, shard_size=128)
    demo = ensure_demo_dataset(tmp_path / "a", **kwargs)
    assert len(demo.train_shards) == 3 and len(demo.val_shards) == 1 and len(demo.captions) == 300
    assert len(demo.classnames) == 20 and set(demo.heldout_classnames) <= set(demo.classnames)
    # Held-out combinations never appear in training captions; every other class does.
    for color, shape in HELDOUT:
        assert not any(color in c and shape in c for c in demo.captions)
    for name in set(demo.classnames) - set(demo.heldout_classnames):
        color, shape = name.split()
        assert any(color in c and shape in c for c in demo.captions)
    # ImageFolder layout: one folder per class, underscores for spaces.
    folders = sorted(p.name for p in (tmp_path / "a").glob("*/zeroshot/*"))
    assert folders == sorted(n.replace(" ", "_") for n in demo.classnames)
    img = Image.open(next(iter(sorted((tmp_path / "a").glob("*/zeroshot/red_circle/*.jpg")))))
    assert img.size == (32, 32) and img.mode == "RGB"
    # The shape is drawn in its colour: the reddest pixels of a red circle are red.
    px = np.asarray(img).reshape(-1, 3).astype(int)
    reddest = px[np.argsort(px[:, 0] - px[:, 1:].max(1))[-10:]]
    assert (reddest[:, 0] > 150).all() and (reddest[:, 1:] < 110).all()
    # Deterministic and cached.
    again = ensure_demo_dataset(tmp_path / "b", **kwargs)
    for x, y in zip(demo.train_shards + demo.val_shards, again.train_shards + again.val_shards):
        assert open(x, "rb").read() == open(y, "rb").read()
    assert ensure_demo_dataset(tmp_path / "a", **kwargs) == demo
    with pytest.raises(ValueError, match="image_size"):
        ensure_demo_dataset(tmp_path / "c", image_size=4)


def test_demo_default_size_is_fast(tmp_path):
    import time

    # CPU time of this process (all its threads), not wall time: other jobs on a shared
    # machine stretch the wall clock, not the work done ("generated in seconds": ~4 s here).
    start = time.process_time()
    demo = ensure_demo_dataset(tmp_path)
    assert time.process_time() - start < 30
    assert len(demo.captions) == 8192 and len(demo.val_shards) == 1
