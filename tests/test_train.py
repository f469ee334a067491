"""End-to-end tests of `python -m clip_fast.train` on CPU (tiny model, a tiny demo dataset).

What is checked against something independent:
  - the checkpoint loads with clip_fast.model.load and `python -m clip_fast.zeroshot`
    reproduces the trainer's zero-shot accuracy from it;
  - resume: k steps + resume + (N - k) steps == N steps straight, bit for bit (fp32 and
    the bf16 + stochastic-rounding setup), across an epoch boundary;
  - 2-process DDP (gloo, spawned without torchrun): the logged step-1 loss equals the loss
    of the union of both ranks' batches computed in one process, and one DDP step moves
    the weights like a single-process step on that union batch;
  - LiT: --pretrained from a saved checkpoint with --lock-image leaves exactly the image
    tower unchanged;
  - faults: a diverging run stops non-zero with valid JSON and no non-finite checkpoint;
    --resume of another model, a text file or a truncated .pt is one line; `latest`
    skips a damaged newest file; an unwritable checkpoint is one line naming the path;
  - torchrun with 2 gloo ranks and `-- --logs=DIR`.
(Command-line tables: test_train_config.py; retrieval, locking, FLOPs: test_train_eval.py.)
"""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from clip_fast import train as T


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """96 training captions (3 shards of 32), 32 validation, 2 zero-shot images per class."""
    from clip_fast.data.demo import ensure_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    return ensure_demo_dataset(root, num_train=96, num_val=32, num_zeroshot_per_class=2, shard_size=32)


@pytest.fixture(scope="module")
def tokenizer_file(demo, tmp_path_factory):
    """One trained tokenizer shared by runs that are compared with each other (BPE
    training in the `tokenizers` library breaks ties between equally frequent merges
    differently from call to call)."""
    from clip_fast.data.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(demo.captions, vocab_size=800).save(path)
    return str(path)


def _argv(demo, save_dir, name, *extra: str) -> list[str]:
    return [
        "--train-data", os.path.dirname(demo.train_shards[0]) + "/*.tar",
        "--val-data", demo.val_shards[0], "--imagenet-val", demo.zeroshot_dir,
        "--logs", str(save_dir), "--name", name, "--batch-size", "16", "--workers", "0",
        "--warmup", "2", "--lr", "1e-3", "--log-every-n-steps", "1", "--device", "cpu", *extra,
    ]


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- short run


def test_short_run_checkpoint_logs_and_zeroshot_cli(demo, tmp_path, capsys):
    out = T.train(_argv(demo, tmp_path, "short", "--max-steps", "3", "--epochs", "1", "--vocab-size", "800",
                        "--save-most-recent", "--report-to", "tensorboard"))
    printed = capsys.readouterr().out
    assert out["step"] == 3 and math.isfinite(out["loss"])
    run = tmp_path / "short"
    ckpt_path = run / "checkpoints" / "step_3.pt"
    assert ckpt_path.is_file() and (run / "checkpoints" / "epoch_latest.pt").is_file()
    assert "step 3/3" in (run / "out.log").read_text() and "batch_size: 16" in (run / "params.txt").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert not list((run / "checkpoints").glob(".*tmp*")), "temporary files left behind"

    # Logs in open_clip's terms, one JSON line per logged step.
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for key in ("loss", "lr", "logit_scale", "samples_per_s", "samples_per_s_per_gpu", "data_wait"):
        assert all(math.isfinite(r[key]) for r in recs), key
    assert recs[0]["mfu"] is None  # CPU: no peak to compare with
    assert recs[0]["lr"] == pytest.approx(1e-3 * 1 / 2) and recs[1]["lr"] == pytest.approx(1e-3)  # warmup 2
    assert "samples/s" in printed and "data-wait" in printed and "[3/6 steps" in printed
    assert "/s/gpu" not in printed and "MFU" not in printed  # CPU: no per-GPU rate, no peak

    # Checkpoint content; weights_only=True loading must work (it is what model.load uses).
    ckpt = _load(ckpt_path)
    assert {"model", "optimizer", "scaler", "step", "epoch", "config", "tokenizer", "args", "rng_states"} <= set(ckpt)
    assert ckpt["step"] == 3 and ckpt["args"]["batch_size"] == 16
    assert ckpt["model"]["logit_scale"] <= math.log(100) + 1e-6
    from clip_fast import model as cf
    from clip_fast.data.tokenizer import Tokenizer

    loaded = cf.load(str(ckpt_path))
    for k, v in out["model"].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    tok = Tokenizer.from_json(ckpt["tokenizer"])
    assert tok.kind == "trained" and tok.vocab_size == loaded.vocab_size

    # The trainer's zero-shot numbers == the standalone CLI's on the same checkpoint.
    zs = json.loads((run / "zeroshot.json").read_text())
    assert zs["n"] == 40 and zs["classes"] == 20 and 0 <= zs["top1"] <= zs["top5"] <= 1
    assert "heldout_top1" in zs and len(zs["heldout_classes"]) == 4
    from clip_fast import zeroshot

    cli_out = tmp_path / "zs.json"
    templates = [a for t in T.DEMO_TEMPLATES for a in ("--templates", t)]
    assert zeroshot.main(["--checkpoint", str(ckpt_path), "--data", demo.zeroshot_dir, "--workers", "0",
                          "--device", "cpu", "--output", str(cli_out), *templates]) == 0
    cli = json.loads(cli_out.read_text())
    assert cli["top1"] == pytest.approx(zs["top1"]) and cli["top5"] == pytest.approx(zs["top5"])
    # Validation loss at the epoch end is not reached with --max-steps 3 < 6 steps/epoch.
    assert not (run / "results.jsonl").read_text().count("val_loss")


def test_siglip_amp_bf16_checkpointing_resnet(demo, tokenizer_file, tmp_path):
    """The other code paths in one short run: SigLIP (model gets a logit bias), bf16
    autocast on CPU, gradient checkpointing, the ModifiedResNet tower."""
    out = T.train(_argv(demo, tmp_path, "rn", "--model", "tiny-rn", "--siglip", "--precision", "amp_bf16",
                        "--grad-checkpointing", "--max-steps", "2", "--tokenizer", tokenizer_file))
    assert out["step"] == 2 and math.isfinite(out["loss"])
    ckpt = _load(out["checkpoint"])
    assert "logit_bias" in ckpt["model"] and ckpt["config"]["init_logit_bias"] == -10.0
    assert ckpt["model"]["logit_scale"] <= math.log(100) + 1e-6
    assert out["model"].visual.layer1[0].conv1.weight.dtype == torch.float32  # amp keeps fp32 weights


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(demo, tokenizer_file, tmp_path, precision):
    """8 steps straight == 4 steps, resume, 4 more (6 steps per epoch: crosses a boundary).
    bf16 covers the SR streams and bf16 moments of the optimizer state."""
    common = ("--epochs", "2", "--precision", precision, "--tokenizer", tokenizer_file)
    straight = T.train(_argv(demo, tmp_path, "straight", "--max-steps", "8", *common))
    T.train(_argv(demo, tmp_path, "split", "--max-steps", "4", *common))
    resumed = T.train(_argv(demo, tmp_path, "split", "--max-steps", "8", "--resume", "latest", *common))
    assert resumed["step"] == straight["step"] == 8 and resumed["epoch"] == 1
    assert resumed["loss"] == straight["loss"]
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    if precision == "bf16":
        assert a["visual.proj"].dtype == torch.bfloat16
    oa = _load(Path(straight["checkpoint"]))["optimizer"]["state"]
    ob = _load(Path(resumed["checkpoint"]))["optimizer"]["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)
    # The step-4 log line of the split run and of the straight run agree too.
    la = [json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    T.train(argv)


def _spawn(argv: list[str]) -> None:
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as clip_fast.train sets it (children read it at start)

    mp.start_processes(_ddp_worker, args=(2, _free_port(), argv), nprocs=2, join=True, start_method="spawn")


DDP_LR = 1e-3


def _dist_argv(demo, tokenizer_file, save_dir, name, *extra):
    return _argv(demo, save_dir, name, "--batch-size", "8", "--warmup", "0", "--lr", str(DDP_LR), "--epochs", "2",
                 "--tokenizer", tokenizer_file, *extra)


@pytest.fixture(scope="module")
def ddp_run(demo, tokenizer_file, tmp_path_factory):
    """Two gloo ranks, 2 steps of 8 samples per rank (spawned, no torchrun)."""
    root = tmp_path_factory.mktemp("ddp")
    argv = _dist_argv(demo, tokenizer_file, root, "ddp", "--max-steps", "2", "--dist", "ddp")
    _spawn(argv)
    return argv, root / "ddp"


def test_ddp_two_processes_match_one_process_on_the_union_batch(demo, ddp_run):
    from clip_fast import ContrastiveLoss
    from clip_fast.data.loader import build_loader
    from clip_fast.data.tokenizer import Tokenizer

    argv, run = ddp_run
    ckpt = _load(run / "checkpoints" / "step_2.pt")
    assert len(ckpt["rng_states"]) == 2 and ckpt["args"]["batch_size"] == 8
    assert json.loads((run / "zeroshot.json").read_text())["n"] == 40  # 20 images per rank, summed
    logged = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]

    # One process: the same initial weights, per step the union of both ranks' batches,
    # the global loss, the same schedule and optimizer.
    tok = Tokenizer.from_json(ckpt["tokenizer"])
    args = T.parse_args(argv)
    model = T.build_model(args, tok, T.DistEnv())
    opt = T.build_optimizer(model, args, fsdp=False)
    ranks = [iter(build_loader(demo.train_shards, 8, 64, tok, rank=r, world_size=2, num_workers=0, seed=0))
             for r in range(2)]
    for step in range(2):
        batches = [next(it) for it in ranks]
        loss = ContrastiveLoss()(*model(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])))
        # Step 1: same weights, so only summation order differs. Step 2 follows an Adam step
        # that amplifies rounding noise in zero-gradient directions (see _assert_same_steps).
        assert logged[step] == pytest.approx(loss.item(), rel=1e-5 if step == 0 else 1e-3)
        for g in opt.param_groups:
            g["lr"] = T.cosine_lr(step, DDP_LR, 0, 12)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.logit_scale.data.clamp_(0, math.log(100))
    for k, v in model.state_dict().items():
        _assert_same_steps(ckpt["model"][k], v, k)


def _assert_same_steps(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Adam's early steps move each element by about lr * g / (|g| + eps), whatever |g|:
    elements whose gradient is rounding noise (the key bias: softmax ignores it, so its
    exact gradient is 0) or nearly cancels between steps differ by a sizeable fraction of
    lr, so single elements are only bounded by Adam's step size; the mean over a tensor
    must be 100x smaller than lr (a wrong data split or loss moves it by O(lr))."""
    diff = (a.float() - b.float()).abs().flatten()
    assert diff.max() <= 2.5 * DDP_LR and diff.mean() <= 1e-2 * DDP_LR, (name, diff.max(), diff.mean())


def test_fsdp2_matches_ddp_and_resumes(demo, tokenizer_file, ddp_run, tmp_path):
    """FSDP2 (fully_shard, gloo) computes the same steps as DDP; its checkpoint gathers
    full weights that clip_fast.model.load reads; resuming from its per-rank optimizer
    shards continues exactly."""
    from clip_fast import model as cf

    def run(name, *extra):
        _spawn(_dist_argv(demo, tokenizer_file, tmp_path, name, "--dist", "fsdp2", *extra))
        return tmp_path / name / "checkpoints" / "latest.pt"

    fsdp_path = run("fsdp", "--max-steps", "2")
    assert (fsdp_path.parent / "step_2.optim.rank1.pt").is_file()
    fsdp, ddp = _load(fsdp_path), _load(ddp_run[1] / "checkpoints" / "step_2.pt")
    for k, v in ddp["model"].items():
        _assert_same_steps(fsdp["model"][k], v, k)
    assert json.loads((tmp_path / "fsdp" / "zeroshot.json").read_text())["n"] == 40
    loaded = cf.load(str(fsdp_path))
    assert torch.equal(loaded.visual.proj, fsdp["model"]["visual.proj"])

    run("fsdp_split", "--max-steps", "1")
    resumed = _load(run("fsdp_split", "--max-steps", "2", "--resume", "latest"))
    assert resumed["step"] == 2
    assert all(torch.equal(resumed["model"][k], v) for k, v in fsdp["model"].items())


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("name", ["tiny-vit", "ViT-B/32", "tiny-rn"])
def test_flop_count_matches_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode

    from clip_fast import model as cf

    model = cf.create(name).eval()
    v, t = model.config.vision, model.config.text
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.encode_image(torch.zeros(1, 3, v.image_size, v.image_size))
    # FlopCounterMode counts linear/conv/mm but not CPU SDPA: add QK^T and AV by hand
    # (L-1 full blocks over n tokens, the last block for one query).
    attention = 0
    if not v.is_resnet:
        n = (v.image_size // v.patch_size) ** 2 + 1
        attention = (v.layers - 1) * 4 * n * n * v.width + 4 * n * v.width
    assert T.image_flops_per_sample(model, torch.device("cpu")) == counter.get_total_flops() + attention

    length = 12
    text = torch.zeros(3, length, dtype=torch.long)
    text[:, -1] = model.vocab_size - 1
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.encode_text(text)
    causal = (t.layers - 1) * 2 * length * length * t.width + 4 * length * t.width
    assert T.text_flops_per_sample(model.config, length) == pytest.approx(counter.get_total_flops() / 3 + causal)


def test_cosine_schedule():
    lrs = [T.cosine_lr(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5) and 0 < lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_peak_flops_table():
    assert T.peak_flops(torch.device("cpu"), "bf16") is None


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, error, match", [
    (["--train-data", "/nonexistent/shard-{000..003}.tar"], FileNotFoundError, "--train-data"),
    (["--train-data", "/nonexistent/*.tar"], FileNotFoundError, "no shard matches"),
    (["--model", "ViT-Q/99"], ValueError, "unknown model config"),
    (["--batch-size", "0"], ValueError, "--batch-size must be an integer >= 1"),
    (["--max-steps", "0"], ValueError, "--max-steps"),
    (["--dist", "fsdp2"], ValueError, "needs torchrun"),
    (["--loss", "siglip", "--local-loss"], ValueError, "siglip"),
    (["--tokenizer", "t.json", "--vocab-size", "900"], ValueError, "--vocab-size"),
])
def test_bad_flags(extra, error, match, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(error, match=match):
        T.train(["--save-dir", "none", *extra])


def test_bad_precision_and_resume(demo, tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: invalid choice
        T.parse_args(["--precision", "fp8"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        T.train(_argv(demo, tmp_path, "empty", "--resume", "latest"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        T.train(_argv(demo, tmp_path, "empty", "--resume", str(tmp_path / "nope.pt")))
    # The CLI prints one clear line and exits with 2.
    assert T.main(_argv(demo, tmp_path, "x", "--batch-size", "1000")) == 2
    assert "batch_size=1000 is larger than" in capsys.readouterr().err

