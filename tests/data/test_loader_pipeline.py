"""The loader's tokenisation worker, mid-epoch resume and DALI pipeline lifecycle
(issue 12, items 9 and 10). DALI runs its CPU pipeline here (device_id=None); the GPU
stream handover is GPU-marked."""
from __future__ import annotations

import subprocess
import threading

import numpy as np
import pytest
import torch

from clip_fast.data import loader as loader_mod
from clip_fast.data.loader import (DaliOptions, DaliShardLoader, TokenizeWorker, TorchShardLoader, build_loader,
                                   dali_available, dali_or_torch, prepare_tokens)
from tests.support.processes import run_python
from tests.support.shard_samples import caption_id_tokenize, write_smooth_shards

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CLIP_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """2 ShardWriter shards, 29 samples of varying sizes."""
    return write_smooth_shards(tmp_path_factory.mktemp("shards"), 29, shard_size=15, seed=1, size_range=(40, 90))


def _word_tokenize(captions: list[str]) -> torch.Tensor:
    """A tokenizer of the model's convention (EOT = the largest id, zero padding, 77 wide):
    one id per character, then EOT."""
    out = torch.zeros(len(captions), 77, dtype=torch.long)
    for row, text in enumerate(captions):
        ids = [1 + ord(c) % 200 for c in text][:76] + [999]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


# ------------------------------------------------------------------------ tokenisation
def test_tokenize_worker_matches_the_synchronous_path_in_order():
    rng = np.random.default_rng(0)
    batches = [[f"caption {i} " + "x" * int(rng.integers(0, 60)) for i in range(int(rng.integers(1, 9)))]
               for _ in range(12)]
    with TokenizeWorker(_word_tokenize, pin=False) as worker:
        futures = [worker.submit(b) for b in batches]
        results = [f.result() for f in futures]
    for captions, got in zip(batches, results):
        want = _word_tokenize(captions)
        width = got.shape[1]
        assert width % 16 == 0 or width == 77
        assert width >= int(want.argmax(-1).max()) + 1  # nothing up to any EOT is cut
        assert torch.equal(got, want[:, :width]) and not want[:, width:].any()


def test_tokenize_worker_propagates_exceptions_and_shuts_down():
    def failing(captions):
        if "bad" in captions:
            raise UnicodeError("tokenizer failed")
        return _word_tokenize(captions)

    before = {t.ident for t in threading.enumerate()}
    worker = TokenizeWorker(failing, pin=False)
    good, bad, after = worker.submit(["fine"]), worker.submit(["bad"]), worker.submit(["fine too"])
    assert good.result().shape[0] == 1
    with pytest.raises(UnicodeError, match="tokenizer failed"):
        bad.result()
    assert after.result().shape[0] == 1  # the worker survives a failed batch
    worker.close()
    assert {t.ident for t in threading.enumerate() if t.name.startswith("clip_fast-tokenize")} <= before


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokenisation_errors_reach_the_training_loop(shards, backend):
    def failing(captions):
        raise UnicodeError("tokenizer failed")

    loader = build_loader(shards, 4, 32, failing, train=True, backend=backend, num_workers=0 if backend == "torch" else 1)
    with pytest.raises(UnicodeError, match="tokenizer failed"):
        next(iter(loader))


@needs_dali
def test_dali_tokenize_worker_stops_at_epoch_end(shards):
    loader = build_loader(shards, 4, 32, _word_tokenize, train=False, backend="dali", num_workers=1)
    for _ in loader:
        pass
    assert not [t for t in threading.enumerate() if t.name.startswith("clip_fast-tokenize")]
    batches = iter(loader)
    next(batches)
    batches.close()  # an abandoned epoch (generator closed) also joins the worker
    assert not [t for t in threading.enumerate() if t.name.startswith("clip_fast-tokenize")]


def test_prepare_tokens_pins_only_when_asked():
    tokens = _word_tokenize(["a", "bb"])
    out = prepare_tokens(tokens, pin=False)
    assert not out.is_pinned() and out.is_contiguous() and out.shape == (2, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_tokens_are_trimmed_and_match_the_tokenizer(shards, backend):
    loader = build_loader(shards, 8, 32, _word_tokenize, train=False, backend=backend, num_workers=1)
    for _, tokens in loader:
        assert tokens.shape[1] % 16 == 0 and tokens.dtype == torch.long
        # each row: the caption's ids then EOT (the tokenizer's own output, cut after it)
        assert (tokens.argmax(-1) < tokens.shape[1]).all()


def test_cap_tokenizer_threads_uses_the_ranks_share(monkeypatch):
    monkeypatch.delenv("RAYON_RS_NUM_CPUS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(loader_mod.os, "cpu_count", lambda: 64)
    loader_mod.cap_tokenizer_threads()
    assert loader_mod.os.environ["RAYON_RS_NUM_CPUS"] == "8"
    assert loader_mod.host_threads(32) == 8 and loader_mod.host_threads(3) == 3
    monkeypatch.setenv("RAYON_RS_NUM_CPUS", "5")  # the user's setting wins
    loader_mod.cap_tokenizer_threads()
    assert loader_mod.os.environ["RAYON_RS_NUM_CPUS"] == "5"


# ------------------------------------------------------------------------------ resume
def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return [(images.clone(), tokens[:, 0].clone()) for images, tokens in loader]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_resume_gives_the_uninterrupted_batches(shards, backend, train):
    full_loader = build_loader(shards, 4, 32, caption_id_tokenize, train=train, backend=backend, num_workers=1, seed=7)
    full = _epoch(full_loader, 1)
    assert len(full) == len(full_loader) == (7 if train else 8)  # 29 samples: drop_last only when training
    resumed_loader = build_loader(shards, 4, 32, caption_id_tokenize, train=train, backend=backend, num_workers=1, seed=7)
    resumed = _epoch(resumed_loader, 1, start_batch=3)
    assert len(resumed) == len(full) - 3
    for (want_images, want_ids), (images, ids) in zip(full[3:], resumed):
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(images, want_images, rtol=0, atol=0)
    if backend == "dali":  # the skipped batches were never decoded
        assert resumed_loader.feed.fed == sum(len(ids) for _, ids in resumed)
    assert resumed_loader.epoch == 2 and resumed_loader.start_batch == 0  # the next pass is whole


def test_bad_start_batch(shards):
    loader = build_loader(shards, 4, 32, caption_id_tokenize, backend="torch", num_workers=0)
    for bad in (-1, 8, 1.5, True):
        with pytest.raises(ValueError, match="start_batch must be an int in"):
            loader.set_epoch(0, bad)


# --------------------------------------------------------------------- DALI lifecycle
@needs_dali
def test_dali_pipeline_is_built_once_across_epochs(shards, monkeypatch):
    loader = build_loader(shards, 4, 32, caption_id_tokenize, train=True, backend="dali", num_workers=1)
    builds = []
    original = DaliShardLoader.build_pipeline
    monkeypatch.setattr(DaliShardLoader, "build_pipeline", lambda self: builds.append(self) or original(self))
    epochs = [_epoch(loader, e) for e in range(3)]
    assert builds == [loader]
    ids = [torch.cat([i for _, i in ep]).tolist() for ep in epochs]
    assert all(len(set(x)) == len(x) == 28 for x in ids) and ids[0] != ids[1]  # reset, reshuffled
    again = build_loader(shards, 4, 32, caption_id_tokenize, train=True, backend="dali", num_workers=1)
    assert [torch.cat([i for _, i in ep]).tolist() for ep in (_epoch(again, 0), _epoch(again, 1))] == ids[:2]
    # an abandoned pass (its prefetched batches must not leak into the next) rebuilds once
    next(iter(loader))
    assert _epoch(loader, 2)[0][1].tolist() == epochs[2][0][1].tolist() and builds.count(loader) == 2


@needs_dali
def test_dali_options_reach_the_mixed_decoder_only():
    options = DaliOptions(hw_decoder_load=0.9, device_memory_padding=1 << 20, preallocate_width_hint=640)
    assert options.decoder_kwargs("mixed") == {"hw_decoder_load": 0.9, "device_memory_padding": 1 << 20,
                                               "preallocate_width_hint": 640}
    assert options.decoder_kwargs("cpu") == {}


@needs_dali
def test_dali_fallback_when_the_first_batch_fails(shards, tmp_path):
    # The index lists an image whose bytes were garbled after indexing: the pipeline
    # builds, its first batch fails; the auto selection falls back to the torch path.
    import shutil

    from clip_fast.data.shards import load_shard_indexes

    broken = []
    for path in shards:
        dst = tmp_path / path.rsplit("/", 1)[1]
        shutil.copy(path, dst)
        shutil.copy(path[:-4] + ".idx", str(dst)[:-4] + ".idx")
        broken.append(str(dst))
    shutil.copy(shards[0].rsplit("/", 1)[0] + "/clip_fast_shards.json", tmp_path / "clip_fast_shards.json")
    indexes = load_shard_indexes(broken)
    with open(broken[0], "r+b") as f:
        for img_off, img_size, _, _ in indexes[0].offsets:
            f.seek(int(img_off))
            f.write(b"\x00" * int(img_size))
    args = (indexes, 4, 32, caption_id_tokenize, False, 0, 1, torch.device("cpu"), torch.float32, 1, 0, False, 16)
    with pytest.warns(RuntimeWarning, match="DALI pipeline could not run"):
        chosen = dali_or_torch(DaliShardLoader(*args))
    assert isinstance(chosen, TorchShardLoader)
    good = load_shard_indexes(shards)
    ok = dali_or_torch(DaliShardLoader(good, *args[1:]))
    assert isinstance(ok, DaliShardLoader)
    ids = torch.cat([t[:, 0] for _, t in ok]).tolist()  # the probe does not eat the first batch
    assert sorted(ids) == list(range(29))


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@needs_dali
def test_dali_gpu_batches_survive_later_runs(shards):
    # DALI outputs are bound to torch's current stream and copied into torch-owned memory:
    # a batch held while the stream is busy (a long kernel queued before the copy) and
    # while DALI runs ahead must equal the same batch taken with a synchronize per step.
    def batches(delay: bool):
        loader = build_loader(shards, 4, 32, caption_id_tokenize, train=False, backend="dali", device="cuda",
                              num_workers=2)
        out = []
        for images, tokens in loader:
            if delay:
                torch.cuda._sleep(50_000_000)  # keep the stream busy: the next copies queue behind
            else:
                torch.cuda.synchronize()
            out.append((images, tokens))
        torch.cuda.synchronize()
        return [(i.cpu(), t.cpu()) for i, t in out]

    for (want_i, want_t), (got_i, got_t) in zip(batches(False), batches(True)):
        assert torch.equal(want_t, got_t)
        torch.testing.assert_close(got_i, want_i, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_tokens_are_pinned_and_transferred(shards):
    loader = build_loader(shards, 4, 32, _word_tokenize, train=False, backend="torch", device="cuda", num_workers=1)
    _, tokens = next(iter(loader))
    assert tokens.is_cuda and tokens.shape[1] % 16 == 0
    assert prepare_tokens(_word_tokenize(["a"]), pin=True).is_pinned()

_FORK_AFTER_DALI = """
import gc
import sys

import torch.utils.data._utils.worker as worker

from clip_fast.data.loader import build_loader
from tests.support.shard_samples import caption_id_tokenize

loop = worker._worker_loop


def collecting_loop(*args, **kwargs):  # a worker whose cycle collector runs at once
    gc.collect()
    return loop(*args, **kwargs)


worker._worker_loop = collecting_loop
shards = sys.argv[1:]
gc.disable()  # the garbage below survives until the torch loader forks its worker
dali = build_loader(shards, 4, 32, caption_id_tokenize, train=False, backend="dali", num_workers=1)
next(iter(dali))
dali.cycle = dali  # only the cycle collector can free it
del dali
loader = build_loader(shards, 4, 32, caption_id_tokenize, train=False, backend="torch", num_workers=1)
print(sum(len(images) for images, _ in loader))
"""


@needs_dali
def test_torch_workers_fork_safely_after_a_dali_pipeline(shards):
    # A DALI pipeline left as cyclic garbage (the DALI fallback drops one) used to be freed
    # inside a forked DataLoader worker, whose destructor then waited forever on a lock
    # copied from the parent: the epoch hung (seen once in a full test run).
    try:
        result = run_python(["-c", _FORK_AFTER_DALI, *shards], timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the torch loader's forked worker hung after a DALI pipeline was dropped")
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == 29
