"""`--accum-freq` through the trainer (`python -m clip_fast.train`, CPU, tiny-vit, fp32).

What is checked against something independent:
  - `--batch-size 16 --accum-freq 4` logs the losses of `--batch-size 64` for the first
    steps (same samples per step: the loader's order does not depend on the batch size;
    tiny-vit has no BatchNorm and no patch dropout, so both runs use the same numbers);
  - resume with accumulation is exact: k steps + `--resume latest` + the rest == the
    run straight through, bit for bit, across an epoch boundary (the data position in
    loader batches is step x accum);
  - a bad `--accum-freq` is one line naming the flag; a diverging accumulated run is
    stopped by the non-finite guard.
(GradCache's own fp64 exactness against a single pass: test_grad_cache*.py.)

Tolerance of the loss comparison. Step 1 evaluates one loss of the same 64 samples with
the same weights; only fp32 rounding differs (matmuls blocked by batch size, text trimmed
per micro-batch). A forward chain of M matmuls with inner length <= K gives a relative
error of order M * sqrt(K) * eps (random-walk accumulation); tiny-vit has M ~ 16 matmuls
per tower and K <= 768 (the patch embedding, 16 x 16 x 3), so 16 * sqrt(768) * eps32
~ 5e-5; the bound below takes 4x that. Later steps add the difference of the weights:
AdamW's update g / (sqrt(v) + eps_adam) is Lipschitz in g with constant <= 1/eps_adam,
and a weight change d moves L by at most sum |g_i| |d_i| <= lr * sum |dg_i| |g_i| eps_adam /
(|g_i| + eps_adam)^2 <= (lr / 4) * ||dg||_1, i.e. lr/4 times the gradients' rounding:
at lr 1e-3 far below the same bound. A step that summed or averaged per-micro-batch
losses instead would differ by O(1) (log 64 vs log 16 at initialisation).
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from clip_fast import train as T
from tests.support.demo_runs import small_demo

EPS32 = torch.finfo(torch.float32).eps
LOSS_RTOL = 4 * 16 * math.sqrt(16 * 16 * 3) * EPS32


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """192 training captions (6 shards of 32): 3 global batches of 64 per epoch."""
    return small_demo(tmp_path_factory, num_train=192)


def _argv(demo, tokenizer_file, save_dir, name, *extra: str) -> list[str]:
    return [
        "--train-data", os.path.dirname(demo.train_shards[0]) + "/*.tar", "--logs", str(save_dir), "--name", name,
        "--workers", "0", "--warmup", "2", "--lr", "1e-3", "--log-every-n-steps", "1", "--device", "cpu",
        "--precision", "fp32", "--model", "tiny-vit", "--tokenizer", tokenizer_file, "--zeroshot-frequency", "0",
        *extra,
    ]


def _logged(save_dir, name) -> list[dict]:
    return [json.loads(x) for x in (save_dir / name / "log.jsonl").read_text().splitlines()]


def test_accumulated_steps_log_the_losses_of_the_big_batch(demo, tokenizer_file, tmp_path):
    common = ("--epochs", "1", "--save-frequency", "0")
    big = T.train(_argv(demo, tokenizer_file, tmp_path, "big", "--batch-size", "64", *common))
    acc = T.train(_argv(demo, tokenizer_file, tmp_path, "acc", "--batch-size", "16", "--accum-freq", "4", *common))
    assert big["step"] == acc["step"] == 3  # 12 loader batches of 16 -> 3 optimizer steps
    la, lb = _logged(tmp_path, "big"), _logged(tmp_path, "acc")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3]
    assert [r["lr"] for r in la] == [r["lr"] for r in lb]  # the schedule counts optimizer steps
    for ra, rb in zip(la, lb):
        assert math.isfinite(ra["loss"]) and ra["loss"] > 1.0  # a real contrastive loss of 64 pairs
        assert abs(ra["loss"] - rb["loss"]) <= LOSS_RTOL * abs(ra["loss"]), (ra["step"], ra["loss"], rb["loss"])
        assert ra["logit_scale"] == pytest.approx(rb["logit_scale"], rel=LOSS_RTOL)
    out = (tmp_path / "acc" / "out.log").read_text()
    assert "3 steps/epoch" in out and "x accum 4 (global 64)" in out


def test_resume_with_accumulation_is_exact(demo, tokenizer_file, tmp_path):
    """5 steps straight == 2 steps, --resume latest, 3 more; 2 loader batches of 16 per
    step, 12 per epoch -> 6 steps per epoch; --epochs 2 with a checkpoint per epoch."""
    common = ("--batch-size", "16", "--accum-freq", "2", "--epochs", "2", "--save-frequency", "1",
              "--train-num-samples", "96")  # 96 / (16 x 2) = 3 steps per epoch: step 5 is in epoch 1
    straight = T.train(_argv(demo, tokenizer_file, tmp_path, "straight", "--max-steps", "5", *common))
    T.train(_argv(demo, tokenizer_file, tmp_path, "split", "--max-steps", "2", *common))
    resumed = T.train(_argv(demo, tokenizer_file, tmp_path, "split", "--max-steps", "5", "--resume", "latest",
                            *common))
    assert resumed["step"] == straight["step"] == 5 and resumed["epoch"] == straight["epoch"] == 1
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    la, lb = _logged(tmp_path, "straight"), _logged(tmp_path, "split")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


@pytest.mark.parametrize("value, wanted", [("0", ">= 1"), ("-2", ">= 1"), ("50", "batches")])
def test_bad_accum_freq_is_one_line(demo, tokenizer_file, tmp_path, capsys, value, wanted):
    code = T.main(_argv(demo, tokenizer_file, tmp_path, "bad", "--batch-size", "16", "--accum-freq", value))
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "--accum-freq" in err and wanted in err, err
    assert "Traceback" not in err


def test_diverging_accumulated_run_is_detected(demo, tokenizer_file, tmp_path, capsys):
    """The non-finite guard sees GradCache's loss and gradients: a run at lr 1e6 stops
    with the --max-nonfinite-steps line, and no checkpoint holds non-finite weights."""
    argv = _argv(demo, tokenizer_file, tmp_path, "nan", "--batch-size", "8", "--accum-freq", "2", "--lr", "1e6",
                 "--warmup", "0", "--max-steps", "6", "--max-nonfinite-steps", "1", "--epochs", "1")
    assert T.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "non-finite" in err and "--max-nonfinite-steps" in err and len(err.splitlines()) == 1, err
    recs = _logged(tmp_path, "nan")
    assert recs[-1]["nonfinite_steps"] >= 2
    for p in (tmp_path / "nan" / "checkpoints").glob("*.pt"):
        model = torch.load(p, map_location="cpu", weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point()), p
