"""open_clip's own trainer on clip_fast's losses (clip_fast.apply_to_open_clip): ten
fp32 CPU steps of open_clip_train.main with and without the patch, on a tiny
registered model and a generated csv dataset, give the same per-step losses to fp32
rounding, and the patched run really calls clip_fast's ContrastiveLoss."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_fast
from tests.support.tiny_open_clip_train import run_recorded, train_flags, write_tiny_setup

BATCH, STEPS = 8, 10
INIT_LOGIT_SCALE = 1 / 0.07  # open_clip's initial exp(logit_scale)


def _step_tolerance(step: int, batch: int) -> float:
    """Step 0 sees identical features, so the two losses differ by the rounding of fp32
    logsumexps of `batch` terms of size <= logit_scale: 16 eps32 (scale + log B). Each
    later step starts from parameters updated with gradients that differed by the same
    relative rounding (Adam passes a relative gradient difference through unchanged, and
    lr 1e-3 keeps its effect on the next loss below the loss's own rounding), so the
    bound grows by at most that much per step."""
    return (step + 1) * 16 * torch.finfo(torch.float32).eps * (INIT_LOGIT_SCALE + math.log(batch))


def _assert_same_training(theirs, ours, batch):
    assert len(theirs) == len(ours) == STEPS, (len(theirs), len(ours))
    assert len(set(ours)) > 1, "the loss never changed: no training happened"
    for step, (a, b) in enumerate(zip(theirs, ours)):
        assert abs(a - b) <= _step_tolerance(step, batch), (step, a, b)


def test_apply_is_idempotent_and_revertible():
    import open_clip.factory as factory

    original = factory.ClipLoss, factory.SigLipLoss
    try:
        first = clip_fast.apply_to_open_clip()
        second = clip_fast.apply_to_open_clip()
        assert first == second == {"ClipLoss": clip_fast.ContrastiveLoss, "SigLipLoss": clip_fast.SigLipLoss}
        assert (factory.ClipLoss, factory.SigLipLoss) == (clip_fast.ContrastiveLoss, clip_fast.SigLipLoss)
    finally:
        restored = clip_fast.revert_open_clip_patch()
    assert restored == {"ClipLoss": original[0], "SigLipLoss": original[1]}
    assert (factory.ClipLoss, factory.SigLipLoss) == original
    assert clip_fast.revert_open_clip_patch() == {}


def test_create_loss_builds_clip_fast_losses_when_applied():
    from types import SimpleNamespace

    import open_clip

    args = SimpleNamespace(distill=False, model="ViT-B-32", siglip=False, local_loss=True, gather_with_grad=True,
                           rank=0, world_size=1, horovod=False, loss_dist_impl=None)
    try:
        clip_fast.apply_to_open_clip()
        clip = open_clip.create_loss(args)
        siglip = open_clip.create_loss(SimpleNamespace(**{**vars(args), "siglip": True}))
    finally:
        clip_fast.revert_open_clip_patch()
    assert type(clip) is clip_fast.ContrastiveLoss and clip.local_loss and clip.gather_with_grad
    assert type(siglip) is clip_fast.SigLipLoss and siglip.dist_impl == "bidir"
    assert type(open_clip.create_loss(args)) is open_clip.ClipLoss


def test_open_clip_train_gives_the_same_losses_on_clip_fast(tmp_path):
    config, csv = write_tiny_setup(tmp_path, BATCH * STEPS, "clipfast-test-tiny")
    runs = {}
    for patch in (False, True):
        flags = train_flags("clipfast-test-tiny", csv, tmp_path / "logs", f"patch{int(patch)}", BATCH)
        runs[patch] = run_recorded(flags, config, patch)
    assert set(runs[False].classes) == {"open_clip.loss.ClipLoss"}
    assert set(runs[True].classes) == {"clip_fast.loss.ContrastiveLoss"}
    _assert_same_training(runs[False].losses, runs[True].losses, BATCH)
    assert "Contrastive_loss" in (tmp_path / "logs" / "patch1" / "out.log").read_text()


def _torchrun(tmp_path, config, csv, patch):
    out = tmp_path / f"losses{int(patch)}"
    flags = train_flags("clipfast-test-tiny", csv, tmp_path / "logs", f"dist{int(patch)}", BATCH // 2)
    helper = Path(__file__).resolve().parents[1] / "support" / "tiny_open_clip_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(helper),
         str(out), str(int(patch)), str(config), "--", *flags, "--dist-backend", "gloo"],
        check=True, env=env, timeout=600, cwd=tmp_path,
    )
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_open_clip_train_on_two_gloo_ranks_gives_the_same_losses_on_clip_fast(tmp_path):
    """The same on 2 ranks (torch.distributed.run, gloo): each rank's loss is the
    global-batch loss of 8 pairs, from its 4 local ones."""
    config, csv = write_tiny_setup(tmp_path, BATCH * STEPS, "clipfast-test-tiny")
    theirs, ours = (_torchrun(tmp_path, config, csv, patch) for patch in (False, True))
    for rank in range(2):
        assert set(theirs[rank]["classes"]) == {"open_clip.loss.ClipLoss"}
        assert set(ours[rank]["classes"]) == {"clip_fast.loss.ContrastiveLoss"}
        _assert_same_training(theirs[rank]["losses"], ours[rank]["losses"], BATCH)


def test_module_entry_point_applies_the_patch_then_runs_open_clip_train(capsys):
    """`python -m clip_fast.open_clip_train FLAGS` = apply_to_open_clip + open_clip's main(FLAGS)."""
    import open_clip.factory as factory

    from clip_fast.open_clip_train import main

    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])  # open_clip's own argparse answers
        assert exit_info.value.code == 0
        assert factory.ClipLoss is clip_fast.ContrastiveLoss
    finally:
        clip_fast.revert_open_clip_patch()
    assert "--train-data" in capsys.readouterr().out
