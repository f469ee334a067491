"""Ahead-of-time compilation of every Triton kernel configuration for real GPUs.

No GPU is needed: `triton.compile` lowers a kernel to PTX and a cubin for a chosen
target (sm_80, sm_90), and the cubin's resource usage is read with the cuobjdump that
ships inside triton. This is rung 4 of the verification ladder (docs/verification.md):

- shared memory (`metadata.shared`) within the device's per-block limit,
- no local memory and no stack frame (LOCAL:0 and STACK:0 in
  `cuobjdump --dump-resource-usage`: no register spills),
- tensor-core instructions in the PTX of kernels that multiply matrices
  (`wgmma` on sm_90, `mma.sync` on sm_80).

clip_fast.aot_signatures lists the configurations each kernel's launchers can pick
(`all_configs`); this module compiles them. `python -m clip_fast.aot` prints the compile
report of all of them. Development tooling: no runtime module imports it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile

from clip_fast.aot_signatures import KernelConfig, all_configs

# Largest dynamic shared memory one block may use (bytes), by compute capability.
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
ARCHS = (80, 90)


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
