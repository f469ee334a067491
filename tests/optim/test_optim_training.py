"""Training quality: with bf16 weights, AdamW + stochastic rounding tracks fp32 AdamW while
round-to-nearest bf16 stalls (updates of ~lr = 1e-3 are below half a bf16 spacing for
weights of magnitude >= 0.5, so nearest rounding drops them)."""
import torch

from clip_fast import optim as O


def _fit(dtype, make_opt, steps=250):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=gen)
    W1 = torch.randn(32, 64, generator=gen) * 0.7
    W2 = torch.randn(64, 8, generator=gen) * 0.5
    Y = torch.tanh(X @ (W1 + 0.2 * torch.randn(W1.shape, generator=gen))) @ (W2 + 0.2 * torch.randn(W2.shape, generator=gen))
    params = [torch.nn.Parameter(W1.to(dtype, copy=True)), torch.nn.Parameter(W2.to(dtype, copy=True))]
    opt = make_opt(params)
    for _ in range(steps):
        # mixed precision: weights stored in `dtype`, compute in fp32 (grads come back in `dtype`)
        loss = ((torch.tanh(X @ params[0].float()) @ params[1].float() - Y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        first = ((torch.tanh(X @ W1) @ W2 - Y) ** 2).mean().item()
        final = ((torch.tanh(X @ params[0].float()) @ params[1].float() - Y) ** 2).mean().item()
    return first, final


def test_bf16_sr_tracks_fp32_adamw_and_round_to_nearest_lags():
    kw = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    start, fp32 = _fit(torch.float32, lambda ps: torch.optim.AdamW(ps, **kw))
    _, sr = _fit(torch.bfloat16, lambda ps: O.AdamW(ps, seed=0, **kw))
    _, sr16 = _fit(torch.bfloat16, lambda ps: O.AdamW(ps, seed=0, state_dtype=torch.float16, **kw))
    _, rne = _fit(torch.bfloat16, lambda ps: O.AdamW(ps, stochastic_rounding=False, **kw))
    print(f"loss: start {start:.4f} fp32 {fp32:.4f} bf16+SR {sr:.4f} bf16+SR/fp16 moments {sr16:.4f} bf16 RNE {rne:.4f}")
    progress = start - fp32
    assert progress > 0.5 * start, (start, fp32)  # the task is learnable in 250 steps
    # Stated tolerance: SR's final loss within 2% of fp32's loss reduction (measured: 0.1%).
    assert abs(sr - fp32) < 0.02 * progress, (fp32, sr)
    assert abs(sr16 - fp32) < 0.02 * progress, (fp32, sr16)
    # Round-to-nearest loses more than 15% of the progress (measured: 25%, 5x fp32's loss).
    assert rne - fp32 > 0.15 * progress, (fp32, rne)
