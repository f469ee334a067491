"""Triton kernels under the interpreter (collected only with TRITON_INTERPRET=1)."""
