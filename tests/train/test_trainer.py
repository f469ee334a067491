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
(Command-line tables: test_config.py; retrieval, locking, FLOPs: test_eval.py.)
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
from tests.support.demo_runs import small_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """96 training captions (3 shards of 32), 32 validation, 2 zero-shot images per class."""
    return small_demo(tmp_path_factory, num_train=96)


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



def test_report_to_wandb_offline(demo, tmp_path, monkeypatch):
    """--report-to wandb writes an offline run (nothing leaves the machine) inside the run
    folder, with open_clip's --wandb-project-name/--wandb-notes and every logged loss."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    T.train(_argv(demo, tmp_path, "wb", "--max-steps", "3", "--epochs", "1", "--report-to", "wandb",
                  "--wandb-project-name", "cf-proj", "--wandb-notes", "cf-notes-1"))
    run = tmp_path / "wb"
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "expected one offline wandb run in the run folder"
    data = files[0].read_bytes()  # protobuf records: strings and JSON values are stored as written
    assert b"cf-proj" in data and b"cf-notes-1" in data and b"train/loss" in data
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(repr(r["loss"]).encode() in data for r in recs)

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
    # The loader starts at the first untrained batch (it does not read the 4 before it).
    assert "resuming epoch 0 at batch 4" in (tmp_path / "split" / "out.log").read_text()
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
    from clip_fast.train import setup

    args = T.parse_args(argv)
    model = setup.build_model(args, setup.model_config(args, tok.vocab_size, tok.context_length), T.DistEnv(), "fp32")
    opt = setup.build_optimizer(model, args, "fp32", fsdp=False)
    ranks = [iter(build_loader(demo.train_shards, 8, 64, tok, rank=r, world_size=2, num_workers=0, seed=0))
             for r in range(2)]
    for step in range(2):
        batches = [next(it) for it in ranks]
        loss = ContrastiveLoss()(*model(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])))
        # Step 1: same weights, so only summation order differs. Step 2 follows an Adam step
        # that amplifies rounding noise in zero-gradient directions (see _assert_same_steps).
        assert logged[step] == pytest.approx(loss.item(), rel=1e-5 if step == 0 else 1e-3)
        for g in opt.param_groups:
            g["lr"] = T.learning_rate(step, args, 12, 6)
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
        # the newest full checkpoint: step_N.pt, not the per-rank step_N.optim.rankR.pt shards
        # (written by other ranks, possibly after it)
        full = [p for p in (tmp_path / name / "checkpoints").glob("step_*.pt") if ".optim." not in p.name]
        return max(full, key=lambda p: int(p.stem.split("_")[1]))

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


# ----------------------------------------------------------------------------- fine-tuning


def test_lit_finetune_locks_exactly_the_image_tower(demo, tokenizer_file, tmp_path):
    """--pretrained FILE (a clip_fast checkpoint) + --lock-image: every image-tower
    parameter ends bit-identical to the checkpoint's, every other one moved."""
    base = T.train(_argv(demo, tmp_path, "base", "--max-steps", "2", "--tokenizer", tokenizer_file))
    start = _load(base["checkpoint"])["model"]
    out = T.train(_argv(demo, tmp_path, "lit", "--max-steps", "3", "--pretrained", base["checkpoint"], "--lock-image",
                        "--lr", "1e-2"))
    for k, p in out["model"].named_parameters():
        if k.startswith("visual."):
            assert torch.equal(p.detach(), start[k]), k
        else:
            assert not torch.equal(p.detach(), start[k]), k
    assert all(not p.requires_grad for p in out["model"].visual.parameters())


# ----------------------------------------------------------------------------- faults


def test_diverging_run_stops_with_valid_json_and_no_bad_checkpoint(demo, tokenizer_file, tmp_path, capsys):
    argv = _argv(demo, tmp_path, "nan", "--lr", "1e6", "--warmup", "0", "--max-steps", "6",
                 "--max-nonfinite-steps", "1", "--tokenizer", tokenizer_file)
    assert T.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "non-finite" in err and "--max-nonfinite-steps" in err and len(err.splitlines()) == 1
    run = tmp_path / "nan"
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]  # strict JSON: no bare NaN
    assert recs[-1]["nonfinite_steps"] >= 2
    for p in (run / "checkpoints").glob("*.pt"):
        assert all(torch.isfinite(v).all() for v in _load(p)["model"].values() if v.is_floating_point()), p


def test_resume_faults(demo, tokenizer_file, tmp_path, capsys):
    common = ("--tokenizer", tokenizer_file, "--epochs", "2")
    first = T.train(_argv(demo, tmp_path, "r", "--max-steps", "2", *common))
    T.train(_argv(demo, tmp_path, "r", "--max-steps", "4", "--resume", "latest", *common))
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    ckpts = tmp_path / "r" / "checkpoints"
    # Another architecture: one line naming both.
    assert T.main(_argv(demo, tmp_path, "r", "--resume", first["checkpoint"], "--model", "tiny-rn", *common)) == 2
    err = capsys.readouterr().err
    assert "tiny-rn" in err and "different model" in err and len(err.strip().splitlines()) == 1
    # A text file and a truncated checkpoint: one line each.
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((ckpts / "step_4.pt").read_bytes()[:5000])
    for bad in (text, truncated):
        assert T.main(_argv(demo, tmp_path, "r", "--resume", str(bad), *common)) == 2
        err = capsys.readouterr().err.strip()
        assert str(bad) in err and len(err.splitlines()) == 1
    # `latest` skips a damaged newest file and removes temporaries of a killed save.
    (ckpts / "step_5.pt").write_bytes(b"PK\x03\x04 damaged")
    (ckpts / ".step_6.pt.tmp-123").write_bytes(b"partial")
    out = T.train(_argv(demo, tmp_path, "r", "--max-steps", "5", "--resume", "latest", *common))
    assert out["step"] == 5 and not list(ckpts.glob(".*tmp*"))


def test_unwritable_checkpoint_is_one_line(demo, tokenizer_file, tmp_path, capsys, monkeypatch):
    from clip_fast.train import checkpoint as ckpt_io

    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", full_disk)
    assert T.main(_argv(demo, tmp_path, "full", "--max-steps", "1", "--tokenizer", tokenizer_file)) == 1
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and "step_1.pt" in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "full" / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- torchrun


def test_torchrun_two_gloo_ranks_with_logs_after_double_dash(demo, tokenizer_file, tmp_path):
    """torchrun's --logs-specs swallows an abbreviated `--logs`: the README's command line
    puts `--` before the script's flags."""
    import subprocess
    import sys

    argv = _dist_argv(demo, tokenizer_file, tmp_path, "tr", "--max-steps", "1")
    argv = [a for a in argv if a not in ("--logs", str(tmp_path))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "clip_fast.train", "--", f"--logs={tmp_path}", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "tr" / "checkpoints" / "step_1.pt").is_file()
    assert len(_load(tmp_path / "tr" / "checkpoints" / "step_1.pt")["rng_states"]) == 2


def test_open_clip_readme_command_on_csv(demo, tokenizer_file, tmp_path):
    """open_clip's README-style command line on a csv file read directly."""
    rows = [f"{img},a photo of a {img.parent.name.replace('_', ' ')}."
            for img in sorted(Path(demo.zeroshot_dir).rglob("*.jpg"))]
    csv = tmp_path / "train.csv"
    csv.write_text("filepath,title\n" + "\n".join(rows) + "\n")
    out = T.train(["--train-data", str(csv), "--dataset-type", "csv", "--csv-separator", ",",
                   "--csv-img-key", "filepath", "--csv-caption-key", "title", "--logs", str(tmp_path), "--name", "oc",
                   "--report-to", "tensorboard", "--save-frequency", "1", "--epochs", "1", "--batch-size", "8",
                   "--workers", "0", "--warmup", "1", "--lr", "1e-3", "--model", "tiny-vit", "--device", "cpu",
                   "--tokenizer", tokenizer_file, "--zeroshot-frequency", "0"])
    run = tmp_path / "oc"
    assert out["step"] == len(rows) // 8 and (run / "checkpoints" / "epoch_1.pt").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*")) and (run / "out.log").is_file()


# ----------------------------------------------------------------------------- multi-rank faults


def _full_disk_worker(rank: int, world: int, port: int, argv: list[str], out_dir: str) -> None:
    """Rank 0's checkpoint writes fail with ENOSPC; each rank records main()'s exit code and
    its stderr line."""
    import contextlib
    import errno
    import io

    from clip_fast.train import checkpoint as ckpt_io

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank == 0:
        real_save = torch.save

        def full_disk(obj, f, *args, **kwargs):  # files fail; in-memory saves (pickling) work
            if isinstance(f, (str, os.PathLike)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, f, *args, **kwargs)
        ckpt_io.torch.save = full_disk
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = T.main(argv)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"code": code, "err": err.getvalue()}))


def test_checkpoint_failure_on_rank0_stops_every_rank(demo, tokenizer_file, tmp_path):
    """2 gloo ranks, rank 0's disk is full: both ranks exit 1 with rank 0's one-line error
    within the test's deadline (before the fix, rank 1 waited at a barrier for 30 minutes)."""
    import time

    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = _dist_argv(demo, tokenizer_file, tmp_path, "full2", "--max-steps", "1")
    ctx = mp.start_processes(_full_disk_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 300
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung after rank 0's checkpoint write failed")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["code"] == 1
        lines = [x for x in r["err"].splitlines() if x.startswith("clip_fast.train:")]  # not library warnings
        assert "Traceback" not in r["err"] and len(lines) == 1 and "No space left on device" in lines[0] and "step_1.pt" in lines[0], r["err"]
    assert not list((tmp_path / "full2" / "checkpoints").glob("*.pt"))


# ----------------------------------------------------------------------------- --dataset-resampled


def test_dataset_resampled_epoch_length_and_exact_resume(demo, tokenizer_file, tmp_path, capsys):
    """--train-num-samples 160 on 96 samples with --dataset-resampled: 10 steps of 16 per
    epoch (longer than the data); 12 steps straight == 6 + resume + 6, bit for bit, across
    the epoch boundary. Resampling a csv file is one line."""
    common = ("--dataset-resampled", "--train-num-samples", "160", "--epochs", "2", "--tokenizer", tokenizer_file,
              "--val-frequency", "0", "--zeroshot-frequency", "0")
    straight = T.train(_argv(demo, tmp_path, "straight", "--max-steps", "12", *common))
    T.train(_argv(demo, tmp_path, "split", "--max-steps", "6", *common))
    resumed = T.train(_argv(demo, tmp_path, "split", "--max-steps", "12", "--resume", "latest", *common))
    assert straight["step"] == resumed["step"] == 12 and straight["epoch"] == resumed["epoch"] == 1
    recs = [json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0] * 10 + [1] * 2  # 160 // 16 steps per epoch
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath\ttitle\nx.png\ta cat\n")
    argv = _argv(demo, tmp_path, "csv", "--dataset-resampled", "--tokenizer", tokenizer_file)
    argv[argv.index("--train-data") + 1] = str(csv)
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--dataset-resampled" in err and len(err.splitlines()) == 1
