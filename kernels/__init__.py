"""Triton kernels of clip_fast: `@triton.jit` functions and their launchers only.

Installed as `clip_fast.kernels`. Importing a module here imports triton, so the
callers in clip_fast/ import these modules lazily, after the backend was chosen.
"""
