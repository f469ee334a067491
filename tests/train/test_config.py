"""clip_fast.train's command line against open_clip's (read from the installed
open_clip_train.params at test time, so a new upstream flag shows up here), the flag table
of docs/training.md, bad command lines, and the learning-rate schedules vs open_clip's scheduler."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clip_fast.train import config as C
from clip_fast.train import main
from clip_fast.train.setup import learning_rate

FLAG_TABLE = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def open_clip_flags() -> dict[str, argparse.Action]:
    """Every option of open_clip_train.params.parse_args, by its long name."""
    import open_clip_train.params as params

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        return original(self, [], namespace)

    argparse.ArgumentParser.parse_args = capture
    try:
        params.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return {a.option_strings[0]: a for a in captured["parser"]._actions if a.option_strings[0] != "-h"}


def test_every_open_clip_flag_is_handled_and_in_the_flag_table():
    flags = open_clip_flags()
    assert len(flags) >= 83
    status = C.open_clip_flag_status()
    table = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| ([a-z ]+?)[:|]", FLAG_TABLE.read_text(), flags=re.M))
    for flag in flags:
        assert flag in status, f"{flag}: open_clip flag unknown to clip_fast's parser"
        assert flag in table, f"{flag}: missing from the flag table of {FLAG_TABLE}"
        assert table[flag].strip() == status[flag].split(":")[0], (flag, table[flag], status[flag])


def _given_value(action: argparse.Action) -> list[str]:
    """A command-line value different from open_clip's default, of the flag's type."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [next(c for c in action.choices if c != action.default)]
    if action.type in (int, float):
        return ["7"]
    return ["x=1"] if action.nargs == "*" else ["something"]


@pytest.mark.parametrize("flag", sorted(C.REJECTED))
def test_rejected_flags_name_the_flag_and_the_reason(flag):
    action = open_clip_flags()[flag]
    with pytest.raises(C.ConfigError, match=re.escape(flag) + ": " + re.escape(C.REJECTED[flag][0])):
        C.parse_args([flag, *_given_value(action), "--logs", "none"])


def test_rejected_flag_at_open_clip_default_is_accepted():
    args = C.parse_args(["--coca-caption-loss-weight", "2.0", "--remote-sync-protocol", "s3", "--logs", "none"])
    assert args.coca_caption_loss_weight == 2.0 and args.remote_sync_protocol == "s3"


def test_accepted_open_clip_flags_parse():
    args = C.parse_args([
        "--logs", "none", "--epochs", "3", "--epochs-cooldown", "1", "--lr-scheduler", "const-cooldown",
        "--lr-cooldown-end", "1e-5", "--lr-cooldown-power", "2", "--grad-clip-norm", "1.0", "--precision", "pure_bf16",
        "--model", "ViT-B-32", "--force-quick-gelu", "--force-patch-dropout", "0.5", "--siglip",
        "--lock-image", "--lock-image-unlocked-groups", "2", "--lock-text", "--lock-text-unlocked-layers", "1",
        "--zeroshot-frequency", "1", "--val-frequency", "2", "--save-most-recent", "--delete-previous-checkpoint",
        "--log-every-n-steps", "5", "--ddp-static-graph", "--use-bn-sync", "--no-set-device-rank", "--seed", "3",
        "--opt", "adamw", "--cache-dir", "/tmp", "--report-to", "tensorboard",
        "--train-data", "x.tar"])
    assert args.lr == 5e-4 and args.beta2 == 0.98 and args.eps == 1e-6  # open_clip's ViT defaults
    assert C.precision_mode(args, "cpu") == "bf16"
    rn = C.parse_args(["--logs", "none", "--model", "RN50", "--train-data", "x.tar"])
    assert (rn.beta2, rn.eps, rn.batch_size, rn.wd, rn.warmup) == (0.999, 1e-8, 64, 0.2, 10000)


@pytest.mark.parametrize("name, mode", [("fp32", "fp32"), ("amp_bf16", "amp_bf16"), ("amp_bfloat16", "amp_bf16"),
                                        ("bf16", "bf16"), ("pure_bf16", "bf16")])
def test_precision_mapping(name, mode):
    assert C.precision_mode(C.parse_args(["--logs", "none", "--precision", name]), "cpu") == mode


BAD = [
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:0"], "--device"),  # no CUDA here
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "abc"], "--batch-size"),
    (["--epochs", "-1"], "--epochs"),
    (["--max-steps", "0"], "--max-steps"),
    (["--lr", "-1"], "--lr"),
    (["--beta1", "1.5"], "--beta1"),
    (["--precision", "fp8"], "--precision"),
    (["--precision", "fp16"], "--precision"),
    (["--precision", "amp"], "--precision"),  # fp16 autocast needs a GPU
    (["--opt", "sgd"], "--opt"),
    (["--lr-scheduler", "linear"], "--lr-scheduler"),
    (["--lr-scheduler", "const-cooldown"], "--epochs-cooldown"),
    (["--grad-clip-norm", "0"], "--grad-clip-norm"),
    (["--model", "ViT-Q/99"], "--model"),
    (["--pretrained", "openai"], "--pretrained"),
    (["--pretrained", "laion2b_s34b_b79k"], "--pretrained"),
    (["--force-image-size", "10"], "--force-image-size"),
    (["--force-patch-dropout", "1.5"], "--force-patch-dropout"),
    (["--dist", "fsdp2"], "--dist"),
    (["--siglip", "--local-loss"], "--local-loss"),
    (["--tokenizer", "t.json", "--vocab-size", "900"], "--vocab-size"),
    (["--report-to", "mlflow"], "--report-to"),
    (["--dist-backend", "mpi"], "--dist-backend"),
    (["--dataset-type", "synthetic"], "--dataset-type"),
    (["--accum-freq", "0"], "--accum-freq"),
    (["--horovod"], "--horovod"),
    (["--remote-sync", "s3://bucket"], "--remote-sync"),
    (["--distill-model", "ViT-L-14"], "--distill-model"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--train-data", "/nonexistent/shard-{000..003}.tar"], "--train-data"),
    (["--imagenet-val", "/nonexistent/dir"], "--imagenet-val"),
    (["--resume", "/nonexistent/x.pt"], "--resume"),
]


@pytest.mark.parametrize("argv, flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_command_lines_give_one_line_naming_the_flag(argv, flag, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["--logs", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and flag in err and "Traceback" not in err, err


def test_logs_must_be_a_writable_folder(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["--logs", str(a_file)]) != 0
    assert "--logs" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not (hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0):  # root writes anyway
        assert main(["--logs", str(locked / "runs")]) != 0
        assert "not writable" in capsys.readouterr().err


def test_cli_bad_value_no_traceback():
    out = subprocess.run([sys.executable, "-m", "clip_fast.train", "--device", "tpu"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "--device" in out.stderr, out.stderr


def _lr_args(**kw) -> argparse.Namespace:
    base = dict(lr=1e-3, warmup=10, skip_scheduler=False, lr_scheduler="cosine", epochs_cooldown=None,
                lr_cooldown_power=1.0, lr_cooldown_end=0.0)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kind", ["cosine", "const", "const-cooldown", "const-cooldown-power"])
def test_schedules_match_open_clip(kind):
    import torch
    from open_clip_train import scheduler as S

    spe, epochs, total = 7, 5, 35
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    if kind == "cosine":
        ref, args = S.cosine_lr(opt, 1e-3, 10, total), _lr_args()
    elif kind == "const":
        ref, args = S.const_lr(opt, 1e-3, 10, total), _lr_args(lr_scheduler="const")
    else:
        power = 2.0 if kind.endswith("power") else 1.0
        ref = S.const_lr_cooldown(opt, 1e-3, 10, total, spe * 2, power, 1e-5)
        args = _lr_args(lr_scheduler="const-cooldown", epochs_cooldown=2, lr_cooldown_power=power,
                        lr_cooldown_end=1e-5)
    for step in range(total):
        assert learning_rate(step, args, total, spe) == pytest.approx(ref(step), rel=1e-12, abs=1e-18), step
    assert learning_rate(3, _lr_args(skip_scheduler=True), total, spe) == 1e-3


def test_torchrun_double_dash_reaches_the_parser():
    args = C.parse_args(["--", "--logs", "none", "--epochs", "2"])
    assert args.logs == "none" and args.epochs == 2
