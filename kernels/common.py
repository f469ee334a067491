"""Triton helpers shared by the kernels of clip_fast.kernels."""
import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def dot(x, y, acc, INPUT_PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """tl.dot(x, y, acc) with a workaround for Triton 3.8's interpreter, which multiplies
    the raw uint16 bit patterns of bf16 operands. Under the interpreter (only; the
    launchers set WIDEN for bf16 CPU tensors) the operands are widened to fp32 first:
    bf16 -> fp32 is exact and so is a bf16 x bf16 product in fp32, so this is the
    tensor cores' math with fp32 accumulation, and every bf16 rounding the GPU path
    makes still happens. GPU builds and the AOT compile check use WIDEN=False."""
    if WIDEN:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x, y, acc, input_precision=INPUT_PRECISION)


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The CUDA device guard of a launch on `tensor`'s device (a no-op context for CPU
    tensors, i.e. the interpreter).

    Triton launches on the *current* CUDA device and its current stream, not on the
    device of the tensors it is given: tensors on cuda:1 while cuda:0 is current would
    be read from the wrong context (an illegal access) or without ordering against
    cuda:1's stream. `torch.cuda.device` makes the tensors' device current for the
    launch (a cheap cudaSetDevice, skipped when it already is) and restores it."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
