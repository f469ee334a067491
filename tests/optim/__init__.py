"""clip_fast.optim: stochastic rounding and AdamW (C++, torch and GPU-marked Triton paths)."""
