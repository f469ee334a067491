"""Tiny CLIP models and batches for the GradCache and text-tower tests: images, captions of
mixed lengths (so the text tower cuts them into length buckets), both losses, every
parameter's gradient, a per-tensor relative-error check, and the trim-is-exact check."""
import torch

from clip_fast import ContrastiveLoss, SigLipLoss
from clip_fast import model as cf

VOCAB = 1000


def captions(batch: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """Token ids of captions whose lengths spread over 2..context (EOT = VOCAB - 1 is the
    largest id, zeros after it): the text tower cuts them into length buckets."""
    lengths = torch.randint(2, context + 1, (batch,), generator=generator)
    lengths[0] = context
    tokens = torch.zeros(batch, context, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        tokens[row, : length - 1] = torch.randint(1, VOCAB - 1, (length - 1,), generator=generator)
        tokens[row, length - 1] = VOCAB - 1
    return tokens


def make_batch(batch: int, image_size: int, dtype: torch.dtype, seed: int = 1, context: int = 77):
    """(images of batch x 3 x image_size^2 from a seeded normal, captions(batch, context))."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=g, dtype=dtype), captions(batch, context, g)


def make_model(name: str, dtype: torch.dtype, siglip: bool, **overrides) -> cf.CLIP:
    """clip_fast model `name` (vocabulary VOCAB, seed 0) in train mode; SigLIP's logit
    scale and bias initialisation when `siglip`."""
    torch.manual_seed(0)
    bias = {"init_logit_bias": -5.0, "init_logit_scale": 2.3} if siglip else {}
    return cf.create(name, vocab_size=VOCAB, **bias, **overrides).to(dtype).train()


def make_loss(kind: str, **kwargs):
    """SigLipLoss for kind "siglip", ContrastiveLoss otherwise."""
    return SigLipLoss(**kwargs) if kind == "siglip" else ContrastiveLoss(**kwargs)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (a full tensor for FSDP2's sharded DTensors)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        assert g is not None, f"{name} got no gradient"
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def split(images: torch.Tensor, texts: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches (images, texts) of the given sizes."""
    return list(zip(images.split(sizes), texts.split(sizes)))


def assert_relative(actual: dict, expected: dict, tol: float) -> None:
    """||a - e|| <= tol * ||e|| per tensor (an exactly-zero reference must be matched
    to within tol absolutely: CLIP's logit_bias gradient)."""
    for name, e in expected.items():
        err = float((actual[name] - e).norm())
        bound = tol * max(float(e.norm()), 1.0 if float(e.norm()) == 0 else 0.0)
        assert err <= bound, f"{name}: |diff| {err:.3e} > {bound:.3e} (|ref| {float(e.norm()):.3e})"


def assert_text_trim_is_exact(model: cf.CLIP, tokens: torch.Tensor, objective) -> None:
    """The text tower cut to length buckets (trim=True) gives the features and the
    gradients of objective(features) of the untrimmed pass (trim=False), for every text
    parameter; for an fp64 model they agree to rounding."""
    results = []
    for trim in (True, False):
        model.zero_grad()
        features = model.encode_text(tokens, trim=trim)
        objective(features).backward()
        results.append((features.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (f_trim, g_trim), (f_full, g_full) = results
    torch.testing.assert_close(f_trim, f_full, rtol=1e-10, atol=1e-12)
    assert g_trim.keys() == g_full.keys()
    for name in g_full:
        torch.testing.assert_close(g_trim[name], g_full[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
