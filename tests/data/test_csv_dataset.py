"""CSV data (open_clip's --dataset-type csv): exact epochs across ranks, bad rows skipped
and counted, open_clip_train's CsvDataset parity (captions, eval image tensors), bad input."""
import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from clip_fast.data.csv_dataset import CsvColumns, read_csv_rows
from clip_fast.data.loader import build_loader

N_GOOD = 23


def smooth_image(rng, h, w):
    low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    a = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).copy()
    a[h // 3 : h // 2, w // 4 : w // 2] = rng.integers(0, 256, size=3)
    return Image.fromarray(a)


def caption_id_tokenize(captions):
    """Test 'tokenizer': the row number written at the end of the caption."""
    return torch.tensor([[int(c.rsplit(" ", 1)[-1])] for c in captions], dtype=torch.long)


def csv_loader(path, separator="\t", **kwargs):
    """build_loader over a CSV file with open_clip's default columns."""
    return build_loader(path, csv=CsvColumns(separator=separator), **kwargs)


def write_csv(path, rows, sep="\t", header=("filepath", "title")):
    lines = [sep.join(header)] + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """N_GOOD good rows (JPEG and PNG, a subfolder, one absolute path) and 3 bad rows."""
    root = tmp_path_factory.mktemp("csv")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_GOOD):
        ext = "png" if i % 3 == 0 else "jpg"
        img = smooth_image(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        img.save(root / "img" / f"{i}.{ext}")
        path = str(root / "img" / f"{i}.{ext}") if i == 5 else f"img/{i}.{ext}"
        rows.append((path, f"a photo, number {i}"))
    (root / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    bad = [("img/missing.jpg", "gone 100"), ("img/0.png", "   "), ("img/corrupt.jpg", "corrupt 101")]
    write_csv(root / "train.csv", rows[:7] + bad + rows[7:])
    write_csv(root / "clean.csv", rows)
    return root


def epoch_ids(loader):
    ids, sizes = [], []
    for images, tokens in loader:
        assert images.shape[1:] == (3, loader.image_size, loader.image_size) and images.dtype == loader.dtype
        ids += tokens[:, 0].tolist()
        sizes.append(len(images))
    return ids, sizes


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("train", [False, True])
def test_every_row_once_per_epoch_across_ranks(dataset, world_size, train):
    slices = {}
    for epoch in (0, 1):
        seen = Counter()
        for rank in range(world_size):
            loader = csv_loader(str(dataset / "clean.csv"), batch_size=4, image_size=24, tokenize=caption_id_tokenize,
                                      train=train, drop_last=False, rank=rank, world_size=world_size, num_workers=0, seed=3)
            loader.set_epoch(epoch)
            ids, sizes = epoch_ids(loader)
            assert len(sizes) == len(loader) and len(ids) == loader.stats.rank_samples
            assert len(ids) == (rank + 1) * N_GOOD // world_size - rank * N_GOOD // world_size
            seen.update(ids)
            slices[epoch, rank] = set(ids)
        assert sorted(seen) == list(range(N_GOOD)) and set(seen.values()) == {1}
    if world_size > 1:  # train: a rank reads a different subset each epoch; eval: the same
        assert (slices[0, 0] != slices[1, 0]) == train


def test_drop_last_equal_batches_and_epoch_advance(dataset):
    counts = []
    for rank in range(3):  # 23 rows / 3 ranks: slices of 7, 8, 8 -> 1 batch of 5 each
        loader = csv_loader(str(dataset / "clean.csv"), batch_size=5, image_size=16, tokenize=caption_id_tokenize,
                                  rank=rank, world_size=3, num_workers=0)
        first, sizes = epoch_ids(loader)
        second, _ = epoch_ids(loader)  # no set_epoch: the next pass is epoch 1
        assert sizes == [5] == [5] * len(loader) and loader.epoch == 2
        counts.append(len(sizes))
        assert first != second
    assert counts == [1, 1, 1]


def test_bad_rows_skipped_and_counted(dataset):
    args = dict(batch_size=4, image_size=16, tokenize=caption_id_tokenize, train=False, drop_last=False, num_workers=0)
    loader = csv_loader(str(dataset / "train.csv"), **args)
    assert loader.stats.skipped == Counter(missing_image=1, empty_caption=1)
    assert loader.stats.samples == N_GOOD + 1  # the corrupt image is found at run time
    ids, _ = epoch_ids(loader)
    assert loader.stats.decode_errors == 1 and loader.stats.total_skipped == 3
    # The corrupt row is replaced by the next row of the file: row 7 is read twice.
    assert sorted(ids) == sorted(list(range(N_GOOD)) + [7])

    verified = csv_loader(str(dataset / "train.csv"), verify_images=True, **args)
    assert verified.stats.skipped == Counter(missing_image=1, empty_caption=1, corrupt_image=1)
    ids, _ = epoch_ids(verified)
    assert sorted(ids) == list(range(N_GOOD)) and verified.stats.decode_errors == 0


def test_train_crops_are_deterministic_per_seed(dataset):
    def first_batch(seed):
        loader = csv_loader(str(dataset / "clean.csv"), batch_size=8, image_size=24, tokenize=caption_id_tokenize,
                                  num_workers=1, seed=seed)
        return next(iter(loader))

    (a, ta), (b, tb), (c, tc) = first_batch(1), first_batch(1), first_batch(2)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(ta, tc)


@pytest.mark.parametrize("image_size", [24, 33])
def test_matches_open_clip_csv_dataset(dataset, monkeypatch, image_size):
    """Same captions, same eval image tensors as open_clip_train's CsvDataset (which
    resolves relative paths against the working directory: run it from the CSV's folder)."""
    open_clip = pytest.importorskip("open_clip")
    data = pytest.importorskip("open_clip_train.data")
    monkeypatch.chdir(dataset)
    captions = []
    ref = data.CsvDataset("clean.csv", open_clip.image_transform(image_size, is_train=False), "filepath", "title",
                          sep="\t", tokenizer=lambda texts: captions.extend(texts) or caption_id_tokenize(texts))
    ref_images = torch.stack([ref[i][0] for i in range(len(ref))])
    loader = csv_loader(str(dataset / "clean.csv"), batch_size=5, image_size=image_size, tokenize=caption_id_tokenize,
                              train=False, num_workers=0)
    images, tokens = map(torch.cat, zip(*loader))
    assert loader.rows.captions == captions
    assert tokens[:, 0].tolist() == list(range(N_GOOD))
    # Both compute (x / 255 - mean) / std in fp32 from the same uint8 pixels (Pillow's
    # bicubic resize, the same crop), in different operation orders: a few roundings of
    # values up to |x| <= 2.2 apart.
    tol = 8 * torch.finfo(torch.float32).eps * 2.2
    torch.testing.assert_close(images, ref_images, rtol=0, atol=tol)


def test_separator_and_columns(dataset, tmp_path):
    write_csv(tmp_path / "c.csv", [(str(dataset / "img" / "1.jpg"), "x 1"), (str(dataset / "img" / "2.jpg"), "x 2")],
              sep=",", header=("image", "caption"))
    rows = read_csv_rows(str(tmp_path / "c.csv"), CsvColumns(img_key="image", caption_key="caption", separator=","))
    assert rows.captions == ["x 1", "x 2"] and rows.images == [str(dataset / "img" / f"{i}.jpg") for i in (1, 2)]
    with pytest.raises(ValueError, match=r"no column 'filepath' \(columns: \['image', 'caption'\]\); choose one with --csv-img-key"):
        read_csv_rows(str(tmp_path / "c.csv"), CsvColumns(separator=","))
    with pytest.raises(ValueError, match=r"no column 'title' .*--csv-caption-key"):
        read_csv_rows(str(tmp_path / "c.csv"), CsvColumns(img_key="image", separator=","))
    # The wrong separator: the header is one column, named in the error.
    with pytest.raises(ValueError, match=r"no column 'image' \(columns: \['image,caption'\]\)"):
        read_csv_rows(str(tmp_path / "c.csv"), CsvColumns(img_key="image", caption_key="caption"))


def test_bad_input(dataset, tmp_path):
    args = dict(batch_size=4, image_size=16, tokenize=caption_id_tokenize)
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        csv_loader(str(tmp_path / "nothing.csv"), **args)
    with pytest.raises(ValueError, match="backend must be 'auto' or 'torch'"):
        csv_loader(str(dataset / "clean.csv"), backend="dali", **args)
    with pytest.raises(ValueError, match="separator must be one character"):
        csv_loader(str(dataset / "clean.csv"), separator="::", **args)
    with pytest.raises(ValueError, match="rank"):
        csv_loader(str(dataset / "clean.csv"), rank=2, world_size=2, **args)
    with pytest.raises(ValueError, match="batch_size=30 is larger"):
        csv_loader(str(dataset / "clean.csv"), batch_size=30, image_size=16, tokenize=caption_id_tokenize)
    write_csv(tmp_path / "empty.csv", [("img/none.jpg", "x 1")])
    with pytest.raises(ValueError, match=r"no usable rows \(skipped: \{'missing_image': 1\}\)"):
        csv_loader(str(tmp_path / "empty.csv"), **args)


def test_relative_to_csv_folder_then_working_directory(dataset, tmp_path, monkeypatch):
    # A path relative to the working directory (open_clip's rule) still resolves.
    monkeypatch.chdir(dataset)
    write_csv(tmp_path / "cwd.csv", [("img/1.jpg", "x 1")])
    assert read_csv_rows(str(tmp_path / "cwd.csv")).images == ["img/1.jpg"]
    # One beside the CSV wins.
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "1.jpg")
    assert read_csv_rows(str(tmp_path / "cwd.csv")).images == [str(tmp_path / "img" / "1.jpg")]
