"""Feature-cached gradient accumulation (GradCache: Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup").

A contrastive loss couples every sample of the batch, so splitting a batch of B into
micro-batches and summing their losses changes the objective. GradCache keeps the
objective exact. With micro-batches x_1..x_N, towers F_theta and features f_m = F_theta(x_m)
(image and text, (B_m, D) each):

    1. f_m = F_theta(x_m) for every m without autograd; keep f_m and m's RNG state;
    2. L = loss(cat_m f_m, s, b) once over the whole batch, the features as leaves:
       G = dL/df (B x D), dL/ds, dL/db;
    3. for every m, replay F_theta(x_m) with autograd and the same RNG state, and
       backpropagate G_m (the rows of G belonging to m).

f_m depends on theta only through x_m, so by the chain rule
dL/dtheta = sum_m (df_m/dtheta)^T G_m: step 3 accumulates exactly the single-pass
gradient in `.grad`. The scale and bias gradients enter through the last replay's
`logit_scale`/`logit_bias` outputs, so they reach the parameters through the model's
own graph (and through DDP/FSDP like every other gradient).

Cost per sample: 2 tower forwards (one without autograd) and 1 backward, plus one loss
over B (a single micro-batch is run as the plain forward, loss and backward). Peak memory: one micro-batch's activations plus O(B*D) (features and their
gradients).

Semantics a single pass does not share:
- BatchNorm (train mode) normalises with each micro-batch's own statistics, as
  open_clip's accumulation does; running statistics are updated once per micro-batch
  (by step 1): the replay leaves every _BatchNorm buffer as step 1 left it.
- Randomness (dropout, patch dropout) is replayed from the CPU and CUDA generator states
  recorded before each micro-batch's first forward (as torch.utils.checkpoint does);
  after the step the generators are where step 1 left them.
- Distributed: the loss is called once per step with this rank's whole local batch, so
  a sharded loss (clip_fast ContrastiveLoss/SigLipLoss with rank/world_size, open_clip's
  ClipLoss) exchanges features once; gradients are reduced once, by the last replay:
  DDP (and FSDP1) replays 1..N-1 run under `no_sync()`, FSDP2 modules under
  `set_requires_gradient_sync(False)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

ModelCall = Callable[[nn.Module, Sequence[Any]], Any]


@dataclasses.dataclass
class _Outputs:
    """One forward's results: normalised features, exponentiated scale, optional bias."""

    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    bias: Optional[torch.Tensor]


def _unpack(out: Any) -> _Outputs:
    """open_clip's model output convention: (image_features, text_features, logit_scale
    [, logit_bias]) or a dict with those keys."""
    if isinstance(out, Mapping):
        missing = [k for k in ("image_features", "text_features", "logit_scale") if k not in out]
        if missing:
            raise ValueError(f"model output dict lacks {missing}; expected image_features, text_features, "
                             "logit_scale[, logit_bias]")
        return _Outputs(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
    if isinstance(out, (tuple, list)) and len(out) in (3, 4):
        return _Outputs(out[0], out[1], out[2], out[3] if len(out) == 4 else None)
    raise ValueError("model output must be (image_features, text_features, logit_scale[, logit_bias]) or a dict "
                     f"with those keys, got {type(out).__name__}")


@dataclasses.dataclass
class _RngState:
    """The CPU generator state and the CUDA generator states of the devices involved."""

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor]

    @classmethod
    def capture(cls, tensors: Sequence[Any]) -> "_RngState":
        devices = {t.device.index for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices.add(torch.cuda.current_device())
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in sorted(devices)})

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body from this state; the generators are restored afterwards."""
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


@contextlib.contextmanager
def batchnorm_buffers_kept(module: nn.Module) -> Iterator[None]:
    """Every _BatchNorm buffer of `module` (running_mean, running_var,
    num_batches_tracked) is restored on exit to its value on entry, bit for bit: a
    recomputed forward leaves the running statistics as the first forward left them."""
    buffers = [
        buf
        for bn in module.modules()
        if isinstance(bn, _BatchNorm)
        for buf in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        if buf is not None
    ]
    saved = [buf.clone() for buf in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in zip(buffers, saved):
                buf.copy_(value)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient reduction on (`enabled`) or deferred for the body: DDP and FSDP1 through
    `no_sync()`, FSDP2 through `set_requires_gradient_sync(False)` (set back to True on
    exit). Other modules: no effect. A torch.compile wrapper is looked through."""
    target = getattr(model, "_orig_mod", model)
    if enabled:
        yield
    elif hasattr(target, "no_sync"):
        with target.no_sync():
            yield
    elif hasattr(target, "set_requires_gradient_sync"):
        target.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            target.set_requires_gradient_sync(True)
    else:
        yield


def _call_model(model: nn.Module, micro_batch: Sequence[Any]) -> Any:
    return model(*micro_batch)


def _total_loss(value: Any) -> torch.Tensor:
    """A loss tensor, or open_clip's output_dict form (the sum of its terms)."""
    if isinstance(value, Mapping):
        value = sum(value.values())
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor (or a dict of them), got {type(value).__name__}")
    return value.reshape(())


@dataclasses.dataclass
class _Cache:
    """Step 1's results: the whole local batch's features (no graph) and per micro-batch
    its size and RNG state."""

    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    bias: Optional[torch.Tensor]
    sizes: list[int]
    rng: list[_RngState]


class GradCache:
    """Exact large-batch contrastive gradients from micro-batches (Gao et al. 2021).

    `step(micro_batches)` adds to every parameter's `.grad` the gradient of
    L = loss_fn(cat image features, cat text features, logit_scale[, logit_bias]) over
    all micro-batches together, as one `loss.backward()` on the concatenated batch would
    (see the module docstring for the algorithm, BatchNorm and RNG semantics), and
    returns L. Zero the gradients before and step the optimizer after, once per step.

    Args:
        model: the model, possibly wrapped in DDP, FSDP1/FSDP2 or torch.compile. Called
            as `model(*micro_batch)` (see `forward`), it returns open_clip's output:
            (image_features, text_features, logit_scale.exp()[, logit_bias]) or a dict
            with those keys; features normalised. clip_fast and open_clip CLIP models
            do this.
        loss_fn: called once per step with the whole local batch's features,
            `loss_fn(image_features, text_features, logit_scale[, logit_bias])`
            (ContrastiveLoss, SigLipLoss, open_clip's ClipLoss/SigLipLoss, with their
            rank/world_size for the distributed loss). Runs outside `autocast`.
        autocast: a zero-argument callable returning the context each forward runs in,
            e.g. `lambda: torch.autocast("cuda", torch.bfloat16)`; default none.
        forward: `forward(model, micro_batch) -> output` replacing `model(*micro_batch)`.
        device: when given, each micro-batch's tensors are moved there right before each
            of its forwards, so the global batch may wait in (pinned) host memory.

    Example:
        cache = GradCache(model, ContrastiveLoss())
        optimizer.zero_grad()
        loss = cache.step(list(zip(images.chunk(16), texts.chunk(16))))
        optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Any],
        *,
        autocast: Optional[Callable[[], ContextManager[Any]]] = None,
        forward: Optional[ModelCall] = None,
        device: Optional[torch.device | str] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("loss_fn", loss_fn), ("autocast", autocast), ("forward", forward)):
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be callable, got {type(value).__name__}")
        if loss_fn is None:
            raise ValueError("loss_fn must be callable, got None")
        if isinstance(autocast, contextlib.AbstractContextManager):
            raise ValueError("autocast must be a zero-argument callable returning a context manager, e.g. "
                             f"lambda: torch.autocast('cuda', torch.bfloat16); got a {type(autocast).__name__} instance")
        self.model = model
        self.loss_fn = loss_fn
        self.autocast = autocast or contextlib.nullcontext
        self.forward = forward or _call_model
        self.device = None if device is None else torch.device(device)

    def step(self, micro_batches: Sequence[Sequence[Any]], grad_scaler: Optional[Any] = None) -> torch.Tensor:
        """Accumulate the gradient of the loss over all `micro_batches` (a list of
        argument tuples, e.g. [(images_1, texts_1), ...]) into `.grad`; return the loss
        (detached). With `grad_scaler` (torch.amp.GradScaler) the backpropagated loss
        is `grad_scaler.scale(loss)`; unscale/step through the scaler afterwards."""
        batches = self._checked(micro_batches)
        if len(batches) == 1:
            return self._single_pass(batches[0], grad_scaler)
        cache = self._cache_features(batches)
        loss, grads = self._feature_gradients(cache, grad_scaler)
        self._replay(batches, cache, grads)
        return loss

    def _checked(self, micro_batches: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
        if not isinstance(micro_batches, Sequence) or isinstance(micro_batches, (str, bytes)):
            raise ValueError("micro_batches must be a list or tuple of micro-batches (each is run twice), "
                             f"got {type(micro_batches).__name__}")
        if len(micro_batches) == 0:
            raise ValueError("micro_batches must hold at least one micro-batch, got an empty sequence")
        for i, mb in enumerate(micro_batches):
            if not isinstance(mb, (tuple, list)):
                raise ValueError(f"micro_batches[{i}] must be a tuple of model arguments, e.g. (images, texts), "
                                 f"got {type(mb).__name__}")
        return list(micro_batches)

    def _inputs(self, micro_batch: Sequence[Any]) -> tuple[Any, ...]:
        if self.device is None:
            return tuple(micro_batch)
        return tuple(x.to(self.device, non_blocking=True) if isinstance(x, torch.Tensor) else x for x in micro_batch)

    def _features(self, inputs: tuple[Any, ...], index: int) -> _Outputs:
        """One forward under the autocast context, its feature shapes checked."""
        with self.autocast():
            out = _unpack(self.forward(self.model, inputs))
        if out.image.dim() != 2 or out.image.shape != out.text.shape:
            raise ValueError(f"micro_batches[{index}]: the model returned image features {tuple(out.image.shape)} "
                             f"and text features {tuple(out.text.shape)}; expected two (B, D) of one shape")
        return out

    def _single_pass(self, micro_batch: Sequence[Any], grad_scaler: Optional[Any]) -> torch.Tensor:
        """One micro-batch: the plain forward, loss and backward. The same gradient and
        BatchNorm/RNG effects as the three steps, one forward cheaper."""
        out = self._features(self._inputs(micro_batch), 0)
        loss = _total_loss(self.loss_fn(out.image, out.text, out.scale, *([out.bias] if out.bias is not None else [])))
        if not loss.requires_grad:
            raise ValueError("loss_fn's result does not depend on the features it was given")
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
        return loss.detach()

    def _cache_features(self, batches: list[Sequence[Any]]) -> _Cache:
        """Step 1: every micro-batch's features without autograd, and its RNG state."""
        images, texts, sizes, rng = [], [], [], []
        with torch.no_grad():
            for i, mb in enumerate(batches):
                inputs = self._inputs(mb)
                rng.append(_RngState.capture(inputs))
                out = self._features(inputs, i)
                images.append(out.image)
                texts.append(out.text)
                sizes.append(out.image.shape[0])
        bias = None if out.bias is None else out.bias.detach()
        return _Cache(torch.cat(images), torch.cat(texts), out.scale.detach(), bias, sizes, rng)

    def _feature_gradients(
        self, cache: _Cache, grad_scaler: Optional[Any]
    ) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
        """Step 2: the loss once over the whole batch, from leaf copies of the cached
        features, scale and bias; returns it and [dI, dT, dscale, dbias] (None where the
        loss does not depend on an input)."""
        leaves = [cache.image, cache.text, cache.scale] + ([cache.bias] if cache.bias is not None else [])
        leaves = [t.detach().requires_grad_() for t in leaves]
        with torch.enable_grad():
            loss = _total_loss(self.loss_fn(*leaves))
            scaled = grad_scaler.scale(loss) if grad_scaler is not None else loss
            grads = list(torch.autograd.grad(scaled, leaves, allow_unused=True))
        if grads[0] is None and grads[1] is None:
            raise ValueError("loss_fn's result does not depend on the features it was given")
        return loss.detach(), grads + [None] * (4 - len(grads))

    def _replay(self, batches: list[Sequence[Any]], cache: _Cache, grads: list[Optional[torch.Tensor]]) -> None:
        """Step 3: each micro-batch's forward again, with autograd and its recorded RNG
        state, backpropagating its rows of dL/dfeatures; the last one also carries the
        scale/bias gradients and is the only one that reduces gradients across ranks."""
        d_image, d_text, d_scale, d_bias = grads
        start = 0
        for i, (mb, size, rng) in enumerate(zip(batches, cache.sizes, cache.rng)):
            last = i == len(batches) - 1
            rows = slice(start, start + size)
            start += size
            with gradient_sync(self.model, enabled=last), batchnorm_buffers_kept(self.model):
                inputs = self._inputs(mb)
                with rng.replayed(), self.autocast():
                    out = _unpack(self.forward(self.model, inputs))
                pairs = [(out.image, d_image[rows] if d_image is not None else None),
                         (out.text, d_text[rows] if d_text is not None else None)]
                if last:
                    pairs += [(out.scale, d_scale), (out.bias, d_bias)]
                live = [(t, g) for t, g in pairs if g is not None and t is not None and t.requires_grad]
                torch.autograd.backward([t for t, _ in live], [g.to(t.dtype).reshape(t.shape) for t, g in live])


__all__ = ["GradCache", "batchnorm_buffers_kept", "gradient_sync"]
