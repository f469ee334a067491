"""Kernels without a GPU: Triton under the interpreter (one process per file of
triton_interp/), ahead-of-time compilation for sm_80/sm_90, the C++ CPU ISA variants."""
