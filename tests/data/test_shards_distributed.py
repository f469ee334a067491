"""Shard indexing split across ranks: each shard scanned once, identical indexes everywhere."""
import functools
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests.support.process_group import run_on_group

N_SHARDS = 5


def _write_foreign_shards(root):
    """Tars without a manifest (every one needs a scan), one with a corrupt image."""
    rng = np.random.default_rng(0)
    paths = []
    for s in range(N_SHARDS):
        path = os.path.join(root, f"foreign-{s}.tar")
        with tarfile.open(path, "w") as tf:
            for i in range(3 + s):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
                data = buf.getvalue() if (s, i) != (2, 1) else b"\xff\xd8\xff\xe0 corrupt"
                for name, payload in ((f"{i:03d}.jpg", data), (f"{i:03d}.txt", f"shard {s} sample {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def _index_on_rank(root, paths, rank, world_size):
    os.environ["CLIP_FAST_CACHE"] = os.path.join(root, "cache")
    from clip_fast.data import shards

    scan = shards.scan_shard

    def counting_scan(path, verify_images=True):
        with open(os.path.join(root, "scans.log"), "a") as f:  # O_APPEND: one line per call
            f.write(f"{rank} {path}\n")
        return scan(path, verify_images)

    shards.scan_shard = counting_scan
    indexes = shards.load_shard_indexes_distributed(paths)
    result = [{"path": i.path, "offsets": i.offsets.tolist(), "skipped": dict(i.skipped)} for i in indexes]
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_each_shard_indexed_once_and_ranks_agree(tmp_path):
    from clip_fast.data.shards import load_shard_indexes

    paths = _write_foreign_shards(str(tmp_path))
    run_on_group(functools.partial(_index_on_rank, str(tmp_path), paths), world_size=2, timeout=240)
    scans = [line.split(" ", 1) for line in (tmp_path / "scans.log").read_text().splitlines()]
    assert sorted(p for _, p in scans) == sorted(paths), "every shard scanned exactly once"
    assert {p: int(r) for r, p in scans} == {p: i % 2 for i, p in enumerate(paths)}, "rank r scans paths[r::2]"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    # The same indexes as one process scanning everything afresh.
    os.environ["CLIP_FAST_CACHE"] = str(tmp_path / "fresh_cache")
    try:
        reference = load_shard_indexes(paths)
    finally:
        del os.environ["CLIP_FAST_CACHE"]
    assert results[0] == [{"path": i.path, "offsets": i.offsets.tolist(), "skipped": dict(i.skipped)} for i in reference]
    assert results[0][2]["skipped"] == {"corrupt_image": 1}


def _index_missing_on_rank(paths, rank, world_size):
    from clip_fast.data.shards import load_shard_indexes_distributed

    with pytest.raises(RuntimeError, match="indexing shards failed on rank 1: FileNotFoundError: .*missing.tar"):
        load_shard_indexes_distributed(paths)


def test_a_failing_rank_fails_every_rank_without_hanging(tmp_path):
    paths = _write_foreign_shards(str(tmp_path))[:1] + [str(tmp_path / "missing.tar")]
    os.environ["CLIP_FAST_CACHE"] = str(tmp_path / "cache")
    try:
        run_on_group(functools.partial(_index_missing_on_rank, paths), world_size=2, timeout=240)
    finally:
        del os.environ["CLIP_FAST_CACHE"]
