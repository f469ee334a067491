"""Tests of the Triton kernels run by Triton's interpreter on CPU tensors.

TRITON_INTERPRET=1 must be set before triton is imported, so these files are collected
only in a process started with it; tests/kernels/test_triton_interpreter.py starts one
per file. Reproduce by hand with:
    TRITON_INTERPRET=1 CLIP_FAST_BACKEND=triton pytest tests/kernels/triton_interp
"""
import os

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]
