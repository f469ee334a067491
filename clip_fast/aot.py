"""Ahead-of-time compilation of every Triton kernel configuration for real GPUs.

No GPU is needed: `triton.compile` lowers a kernel to PTX and a cubin for a chosen
target (sm_80, sm_90), and the cubin's resource usage is read with the cuobjdump that
ships inside triton. This is rung 4 of the verification ladder (docs/verification.md):

- shared memory (`metadata.shared`) within the device's per-block limit,
- no local memory and no stack frame (LOCAL:0 and STACK:0 in
  `cuobjdump --dump-resource-usage`: no register spills),
- tensor-core instructions in the PTX of kernels that multiply matrices
  (`wgmma` on sm_90, `mma.sync` on sm_80).

Every module of `clip_fast.kernels` that defines `aot_configs() -> list[KernelConfig]`
(the configurations its launcher can pick) is found and compiled. `python -m clip_fast.aot` prints the
compile report of all of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pkgutil
import re
import subprocess
import tempfile
from typing import Any, Callable

# Largest dynamic shared memory one block may use (bytes), by compute capability.
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
ARCHS = (80, 90)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One compilable configuration of a Triton kernel."""

    name: str  # unique id, e.g. "contrastive_fwd[bf16,D=512]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # every argument -> "*bf16", "i32", "fp32", ... or "constexpr"
    constexprs: dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
    enable_fp_fusion: bool = True  # Triton's default; False where the launcher passes it
    uses_tensor_cores: bool = False  # True for kernels built around tl.dot
    # Arguments the compiler may assume divisible by 16 (pointers: 16-byte aligned). At
    # run time Triton specialises on exactly this for aligned tensors and integers that
    # are multiples of 16, so listing them compiles the variant a typical call runs.
    aligned: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CompileReport:
    name: str
    arch: int
    registers: int
    shared_bytes: int
    local_bytes: int
    stack_bytes: int
    has_mma: bool  # mma.sync in the PTX
    has_wgmma: bool  # wgmma.mma_async in the PTX

    def problems(self, uses_tensor_cores: bool) -> list[str]:
        found = []
        limit = SHARED_MEMORY_LIMIT[self.arch]
        if self.shared_bytes > limit:
            found.append(f"shared memory {self.shared_bytes} B exceeds the sm_{self.arch} limit {limit} B")
        if self.local_bytes != 0:
            found.append(f"LOCAL:{self.local_bytes} (register spills)")
        if self.stack_bytes != 0:
            # ptxas puts spilled registers in the stack frame; cuobjdump can show
            # LOCAL:0 with a non-zero STACK for exactly that case.
            found.append(f"STACK:{self.stack_bytes} (stack frame: register spills)")
        if uses_tensor_cores:
            if self.arch >= 90 and not self.has_wgmma:
                found.append("no wgmma instruction in the sm_90 PTX")
            if self.arch < 90 and not self.has_mma:
                found.append("no mma.sync instruction in the sm_80 PTX")
        return found


def cuobjdump_path() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships with triton's NVIDIA backend)")
    return path


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", out)
        if match is None:
            raise RuntimeError(f"no {key} in cuobjdump output:\n{out}")
        usage[key] = int(match.group(1))
    return usage


def compile_config(config: KernelConfig, arch: int) -> CompileReport:
    """Compile `config` for sm_`arch` and read off its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_index = {name: i for i, name in enumerate(config.fn.arg_names)}
    attrs = {(arg_index[name],): [["tt.divisibility", 16]] for name in config.aligned}
    source = ASTSource(fn=config.fn, signature=config.signature, constexprs=config.constexprs, attrs=attrs)
    kernel = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
            "enable_fp_fusion": config.enable_fp_fusion,
        },
    )
    usage = _resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    return CompileReport(
        name=config.name,
        arch=arch,
        registers=usage["REG"],
        shared_bytes=kernel.metadata.shared,
        local_bytes=usage["LOCAL"],
        stack_bytes=usage["STACK"],
        has_mma=re.search(r"\bmma\.sync", ptx) is not None,
        has_wgmma=re.search(r"\bwgmma\.mma_async", ptx) is not None,
    )


def kernel_modules() -> list[str]:
    import clip_fast.kernels

    return sorted(f"clip_fast.kernels.{m.name}" for m in pkgutil.iter_modules(clip_fast.kernels.__path__))


def all_configs() -> list[KernelConfig]:
    configs: list[KernelConfig] = []
    for module_name in kernel_modules():
        module = importlib.import_module(module_name)
        if hasattr(module, "aot_configs"):
            configs.extend(module.aot_configs())
    names = [c.name for c in configs]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise ValueError(f"duplicate kernel configuration names: {sorted(duplicated)}")
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="", help="only configurations whose name contains this")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="sm version (repeatable)")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    failures = 0
    print(f"{'kernel configuration':58s} {'arch':>5s} {'regs':>5s} {'smem(B)':>8s} {'local':>6s} {'stack':>6s} tensor-cores  status")
    for config in all_configs():
        if args.filter not in config.name:
            continue
        for arch in archs:
            report = compile_config(config, arch)
            problems = report.problems(config.uses_tensor_cores)
            failures += bool(problems)
            tc = ("wgmma" if report.has_wgmma else "mma" if report.has_mma else "-") if config.uses_tensor_cores else "n/a"
            status = "ok" if not problems else "; ".join(problems)
            print(
                f"{config.name:58s} sm_{arch:<2d} {report.registers:5d} {report.shared_bytes:8d} "
                f"{report.local_bytes:6d} {report.stack_bytes:6d} {tc:>12s}  {status}",
                flush=True,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
