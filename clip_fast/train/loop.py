"""The training loop: one step, the logging interval, epoch ends, checkpoints.

A step makes no host synchronisation: the loss, the count of non-finite steps and the
text lengths are summed on the device and read once per logging interval. A step whose
loss or gradient norm is not finite is skipped without a sync: its gradients are
multiplied by NaN, which clip_fast's AdamW treats as "leave parameter and moments
unchanged" (GradScaler skips the step itself under --precision amp). After
--max-nonfinite-steps counted steps the run stops (TrainingDiverged, non-zero exit);
`counts_as_nonfinite` says which skipped steps count (not GradScaler's overflow skips).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
import torch
import torch.distributed as dist

from clip_fast.model.flops import estimate_mfu, train_flops_per_sample
from clip_fast.train import checkpoint as ckpt_io
from clip_fast.train.evaluate import validate, zeroshot
from clip_fast.train.metrics import StepMeter, format_step, memory_stats
from clip_fast.train.run import Run, checkpoint_state, restore_training_state, weights_finite
from clip_fast.train.setup import learning_rate

LOGIT_SCALE_MAX = math.log(100.0)  # the paper: the temperature never exceeds 100


class TrainingDiverged(RuntimeError):
    """Too many steps with a non-finite loss or gradient."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    loss: float = float("nan")  # at the last logging interval
    lr: float = 0.0
    nonfinite_steps: int = 0
    zeroshot: dict | None = None
    last_checkpoint: Path | None = None
    sums: torch.Tensor | None = None  # device: [loss of the last step, non-finite steps, text tokens]
    meter: StepMeter = field(default_factory=StepMeter)


def _grad_multiplier(run: Run, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(device scalar that every gradient is multiplied by, the global gradient norm): the
    --grad-clip-norm factor (1 without), NaN when the loss or the gradient norm is not
    finite (the step is skipped)."""
    grads = [p.grad for p in run.raw.parameters() if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    sharded = [g for g, raw in zip(local, grads) if raw is not g]
    plain = [g for g, raw in zip(local, grads) if raw is g]
    zero = torch.zeros((), device=loss.device)
    sq_sharded = torch.stack([n.float() ** 2 for n in torch._foreach_norm(sharded)]).sum() if sharded else zero
    if sharded and run.env.world_size > 1:
        dist.all_reduce(sq_sharded)  # FSDP2 shards: the global norm (a collective, no host sync)
    sq = sq_sharded + (torch.stack([n.float() ** 2 for n in torch._foreach_norm(plain)]).sum() if plain else zero)
    norm = sq.sqrt()
    finite = torch.isfinite(norm) & torch.isfinite(loss.detach())
    clip = run.args.grad_clip_norm
    factor = (clip / (norm + 1e-6)).clamp(max=1.0) if clip else torch.ones_like(norm)
    return torch.where(finite, factor, torch.full_like(norm, float("nan"))), norm


def counts_as_nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor, loss_scale: torch.Tensor | None) -> torch.Tensor:
    """Whether a step counts toward --max-nonfinite-steps (a device bool, no sync).

    Counted: a non-finite loss, always; a non-finite gradient norm without GradScaler.
    Under GradScaler (--precision amp) a finite loss with non-finite unscaled gradients is
    an overflow of the scaled fp16 gradients: GradScaler skips the step and halves the
    scale, which is normal loss scaling and is not counted -- unless the scale that step
    ran with was already <= 1, where the gradients were not amplified and the overflow is
    the model's own."""
    bad_loss = ~torch.isfinite(loss.detach().float())
    bad_grad = ~torch.isfinite(grad_norm)
    if loss_scale is not None:
        bad_grad = bad_grad & (loss_scale.reshape(()) <= 1.0)
    return bad_loss | bad_grad


MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


def loss_and_gradients(run: Run, micro_batches: MicroBatches) -> torch.Tensor:
    """L over the step's whole batch, with dL/dtheta (scaled under amp) in `.grad`.

    One (images, tokens) batch: one forward and backward. --accum-freq N batches:
    clip_fast.GradCache computes the same L and gradient as one pass over their
    concatenation would (2 tower forwards + 1 backward per sample, one loss over all
    N x batch-size samples, one gradient reduction across ranks)."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.grad_cache is not None:
        return run.grad_cache.step(micro_batches, grad_scaler=run.scaler if run.scaler.is_enabled() else None)
    (images, tokens), = micro_batches
    with run.eval.autocast():
        out = run.model(images, tokens)
    loss = run.loss_fn(*out)  # the blockwise losses pick their own precision: outside autocast
    run.scaler.scale(loss).backward()
    return loss


def train_step(run: Run, state: TrainState, micro_batches: MicroBatches) -> None:
    """Loss and gradients of the global batch, the non-finite guard and clipping, one
    optimizer step."""
    for g in run.optimizer.param_groups:
        g["lr"] = state.lr
    loss = loss_and_gradients(run, micro_batches)
    if run.scaler.is_enabled():
        run.scaler.unscale_(run.optimizer)
    factor, grad_norm = _grad_multiplier(run, loss)
    # GradScaler's current scale as a device tensor (get_scale() would sync the host).
    loss_scale = run.scaler._scale if run.scaler.is_enabled() else None
    counted = counts_as_nonfinite(loss, grad_norm, loss_scale)
    grads = [p.grad for p in run.raw.parameters() if p.grad is not None]
    torch._foreach_mul_([g.to_local() if hasattr(g, "to_local") else g for g in grads], factor)
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    with torch.no_grad():
        scale = run.raw.logit_scale
        (scale.to_local() if hasattr(scale, "to_local") else scale).clamp_(0, LOGIT_SCALE_MAX)
        # the trimmed length the text tower ran, averaged over micro-batches (no sync)
        length = torch.stack([tokens.argmax(-1).max() for _, tokens in micro_batches]).float().mean() + 1
        step_sums = torch.stack([loss.detach().float(), counted.float(), length.float()])
        state.sums = step_sums if state.sums is None else torch.cat([step_sums[:1], state.sums[1:] + step_sums[1:]])
    state.step += 1


def log_interval(run: Run, state: TrainState) -> None:
    """The logging sync: read the device sums, all-reduce the loss, print and write."""
    values = state.sums.tolist()
    loss = values[0]
    if run.env.world_size > 1:
        t = torch.tensor([loss], device=run.env.device, dtype=torch.float64)
        dist.all_reduce(t)
        loss = float(t) / run.env.world_size
    state.loss, state.nonfinite_steps = loss, state.nonfinite_steps + int(values[1])
    m = state.meter
    if run.env.device.type == "cuda":
        torch.cuda.synchronize(run.env.device)
    per_gpu = m.samples / m.elapsed
    flops = train_flops_per_sample(run.raw, run.image_flops, values[2] / max(m.steps, 1))
    scale = run.raw.logit_scale
    scale = scale.full_tensor() if hasattr(scale, "full_tensor") else scale
    in_epoch = state.step - state.epoch * run.steps_per_epoch
    rec = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": state.lr,
           "logit_scale": float(scale.detach().float().exp()), "samples_per_s": per_gpu * run.env.world_size,
           "samples_per_s_per_gpu": per_gpu, "data_wait": m.data_wait / m.elapsed,
           "tflops_per_gpu": flops * per_gpu / 1e12, "mfu": estimate_mfu(flops, per_gpu, run.peak_flops),
           "nonfinite_steps": state.nonfinite_steps, **memory_stats(run.env.device)}
    run.log.info(format_step({**rec, "in_epoch": in_epoch, "steps_per_epoch": run.steps_per_epoch,
                              "stop_step": run.stop_step}, run.env.world_size, run.env.device.type == "cuda"))
    run.log.progress(state.step, f"loss {loss:.4f}")
    run.log.jsonl("log.jsonl", rec)
    run.log.scalars("train", rec, state.step)
    state.sums = None
    m.reset()
    if state.nonfinite_steps > run.args.max_nonfinite_steps:
        raise TrainingDiverged(
            f"{state.nonfinite_steps} steps had a non-finite loss or gradient (--max-nonfinite-steps "
            f"{run.args.max_nonfinite_steps}), the last by step {state.step}; they were skipped and no checkpoint "
            "holds them. Lower --lr, add --grad-clip-norm or use --precision amp_bf16")


def save_checkpoint(run: Run, state: TrainState, name: str) -> Path | None:
    """Write checkpoints/<name>.pt (FSDP2: plus this rank's optimizer shard), then
    epoch_latest.pt / pruning as the flags ask. A non-finite model is never saved. With
    several ranks the outcome is exchanged after the writes: when any rank's write failed,
    every rank raises the same CheckpointError (rather than waiting at a barrier for the
    process-group timeout)."""
    if run.checkpoint_dir is None:
        return None
    if not weights_finite(run.raw, run.env.world_size):
        raise TrainingDiverged(f"step {state.step}: the weights are not finite; checkpoint {name}.pt not written")
    content = checkpoint_state(run, state.step, state.epoch)
    path = run.checkpoint_dir / f"{name}.pt"
    error = None
    try:
        _write_checkpoint(run, content, path, name)
    except ckpt_io.CheckpointError as e:
        error = str(e)
    if run.env.world_size > 1:  # also the barrier: every rank learns whether any write failed
        errors: list[str | None] = [None] * run.env.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise ckpt_io.CheckpointError(error)
    state.last_checkpoint = path
    return path


def _write_checkpoint(run: Run, content: dict, path: Path, name: str) -> None:
    """This rank's files of checkpoint `path` (CheckpointError when one cannot be written)."""
    if run.fsdp:
        ckpt_io.atomic_save(run.optimizer.state_dict(), ckpt_io.optimizer_shard_path(path, run.env.rank))
    if run.env.is_main:
        ckpt_io.atomic_save(content, path)
        if run.args.save_most_recent and name != "epoch_latest":
            ckpt_io.atomic_save(content, path.with_name("epoch_latest.pt"))
        if run.args.delete_previous_checkpoint:
            ckpt_io.prune_previous(run.checkpoint_dir, path)


def run_zeroshot(run: Run, state: TrainState) -> None:
    for prefix, folder in run.data.zeroshot.items():
        t0 = time.time()
        res = zeroshot(run.eval, run.tokenizer, folder, run.templates, run.data.heldout_classnames)
        res.update(epoch=state.epoch, step=state.step, seconds=round(time.time() - t0, 2))
        held = f", held-out classes top-1 {100 * res['heldout_top1']:.1f}%" if "heldout_top1" in res else ""
        run.log.info(f"Zero-shot {prefix} (step {state.step}): top-1 {100 * res['top1']:.2f}%  top-5 "
                     f"{100 * res['top5']:.2f}%  ({res['n']} images, {res['classes']} classes, chance "
                     f"{100 * res['chance_top1']:.1f}%{held})")
        named = {f"{prefix}-zeroshot-val-top1": res["top1"], f"{prefix}-zeroshot-val-top5": res["top5"]}
        run.log.jsonl("results.jsonl", {**res, **named})
        run.log.scalars("val", named, state.step)
        if prefix == "imagenet" or state.zeroshot is None:
            state.zeroshot = res


def _due(epoch: int, frequency: int, last_epoch: int) -> bool:
    return bool(frequency) and (epoch % frequency == 0 or epoch == last_epoch)


def end_of_epoch(run: Run, state: TrainState) -> None:
    """open_clip's order after an epoch: checkpoint, then validation and zero-shot."""
    state.epoch += 1
    a = run.args
    if _due(state.epoch, a.save_frequency, a.epochs) and state.step < run.stop_step:
        save_checkpoint(run, state, f"epoch_{state.epoch}")
    if run.val_loader is not None and _due(state.epoch, a.val_frequency, a.epochs):
        v = validate(run.eval, run.val_loader, run.loss_fn, a.val_num_samples)
        run.log.info(f"Eval epoch {state.epoch}: val loss {v['val_loss']:.4f} ({v['val_samples']} samples), "
                     f"image->text R@1 {100 * v['image_to_text_R@1']:.1f}%, text->image R@1 "
                     f"{100 * v['text_to_image_R@1']:.1f}%")
        run.log.jsonl("results.jsonl", {"epoch": state.epoch, "step": state.step, **v})
        run.log.scalars("val", v, state.step)
    if _due(state.epoch, a.zeroshot_frequency, a.epochs) and state.step < run.stop_step:
        run_zeroshot(run, state)


def _sync_debug(run: Run, step: int) -> None:
    """CLIP_FAST_SYNC_DEBUG="start:end": torch.cuda sync debug mode 'warn' for those steps."""
    spec = os.environ.get("CLIP_FAST_SYNC_DEBUG")
    if not spec or run.env.device.type != "cuda":
        return
    start, end = (int(x) for x in spec.split(":"))
    if step == start:
        torch.cuda.set_sync_debug_mode("warn")
    elif step == end:
        torch.cuda.set_sync_debug_mode(0)


def _batches(run: Run, state: TrainState):
    """This epoch's batches from the current position. A resumed run starts the loader at
    the first batch it has not trained on (the loader neither reads nor decodes the ones
    before), then restores the RNG states it saved."""
    skip = (state.step - state.epoch * run.steps_per_epoch) * run.args.accum_freq  # loader batches
    if skip:
        run.log.info(f"resuming epoch {state.epoch} at batch {skip}")
    run.loader.set_epoch(state.epoch, skip)
    batches = iter(run.loader)
    if run.resume is not None:  # after the loader drew its seeds: the run continues bit for bit
        states = run.resume.get("rng_states") or []
        if len(states) == run.env.world_size:
            ckpt_io.set_rng_state(states[run.env.rank])
        run.resume = None
    return batches


def _step_batches(run: Run, state: TrainState, batches) -> MicroBatches:
    """The next --accum-freq loader batches: one optimizer step's global batch."""
    micro_batches = []
    for _ in range(run.args.accum_freq):
        images, tokens = next(batches, (None, None))
        if images is None:
            done = (state.step - state.epoch * run.steps_per_epoch) * run.args.accum_freq + len(micro_batches)
            raise RuntimeError(f"the loader ended epoch {state.epoch} after {done} of "
                               f"{run.steps_per_epoch * run.args.accum_freq} batches")
        micro_batches.append((images, tokens))
    return micro_batches


def train_epoch(run: Run, state: TrainState) -> None:
    batches = _batches(run, state)
    epoch_end = min(run.stop_step, (state.epoch + 1) * run.steps_per_epoch)
    while state.step < epoch_end:
        _sync_debug(run, state.step)
        t0 = time.time()
        micro_batches = _step_batches(run, state, batches)
        state.lr = learning_rate(state.step, run.args, run.total_steps, run.steps_per_epoch)
        waited = time.time() - t0
        train_step(run, state, micro_batches)
        state.meter.add(sum(images.shape[0] for images, _ in micro_batches), waited)
        if state.step % run.args.log_every_n_steps == 0 or state.step == run.stop_step:
            log_interval(run, state)
        if run.args.save_every_n_steps and state.step % run.args.save_every_n_steps == 0 and state.step < run.stop_step:
            save_checkpoint(run, state, f"step_{state.step}")


def train_loop(run: Run) -> TrainState:
    """Epochs until --epochs or --max-steps; a final checkpoint and zero-shot at the end."""
    state = TrainState(step=restore_training_state(run))
    state.epoch = state.step // run.steps_per_epoch
    run.model.train()
    try:
        while state.step < run.stop_step:
            train_epoch(run, state)
            if state.step % run.steps_per_epoch == 0:
                end_of_epoch(run, state)
    except KeyboardInterrupt:
        run.log.info(f"interrupted at step {state.step}")
        if run.env.world_size == 1:  # a collective save could hang when only some ranks were interrupted
            save_checkpoint(run, state, f"step_{state.step}")
        raise
    at_epoch_end = state.step % run.steps_per_epoch == 0
    save_checkpoint(run, state, f"epoch_{state.epoch}" if at_epoch_end else f"step_{state.step}")
    if run.args.zeroshot_frequency:
        run_zeroshot(run, state)
    return state
