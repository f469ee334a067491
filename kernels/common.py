"""Triton helpers shared by the kernels of clip_fast.kernels."""
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
