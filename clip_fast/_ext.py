"""Loader of the C++ extension (csrc/*.cpp, OpenMP, pybind11).

Order of attempts, done once per process:

1. `clip_fast._C`, built by setup.py when torch was importable at build time;
2. the same sources compiled on first use with ninja through
   `torch.utils.cpp_extension.load`, cached in a per-user directory keyed by a hash of
   the sources and the torch version (`$CLIP_FAST_EXT_DIR`, default
   `~/.cache/clip_fast/ext`), so later processes load it in milliseconds;
3. nothing: callers use their pure-torch path and a one-time warning says why.

`CLIP_FAST_JIT_EXT=0` disables step 2 (e.g. machines without a compiler).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import sys
from pathlib import Path
from types import ModuleType

from clip_fast._warnings import warn_once

# The flags setup.py uses too. -ffp-contract=off: no fused multiply-add, so the CPU path
# rounds exactly like the torch and Triton paths (see csrc/adamw_sr.h).
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]


def csrc_dir() -> Path:
    import clip_fast.csrc

    return Path(clip_fast.csrc.__file__).resolve().parent


def _build_dir(sources: list[str]) -> Path:
    import torch

    # The source directory is part of the key: the build commands name it, so two checkouts
    # sharing one cache would otherwise rebuild over each other's (identical) directory.
    digest = hashlib.sha256(torch.__version__.encode() + str(csrc_dir()).encode())
    for path in sorted(glob.glob(str(csrc_dir() / "*.h"))) + sources:
        digest.update(Path(path).read_bytes())
    root = Path(os.environ.get("CLIP_FAST_EXT_DIR", Path.home() / ".cache" / "clip_fast" / "ext"))
    path = root / digest.hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load

    sources = sorted(glob.glob(str(csrc_dir() / "*.cpp")))
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {csrc_dir()}")
    build_dir = _build_dir(sources)
    if not (build_dir / "clip_fast_C.so").exists():
        # the first use on a machine compiles for ~40 s (2 cores): say so instead of hanging silently
        print(f"clip_fast: compiling the C++ extension once (about a minute), cached in {build_dir}",
              file=sys.stderr, flush=True)
    return load(
        name="clip_fast_C",
        sources=sources,
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        extra_include_paths=[str(csrc_dir())],
        build_directory=str(build_dir),
        verbose=False,
    )


@functools.lru_cache(maxsize=None)
def load_extension() -> ModuleType | None:
    """The compiled extension module, or None (with a one-time warning) when unavailable."""
    try:
        from clip_fast import _C  # type: ignore[attr-defined]

        return _C
    except ImportError:
        pass
    if os.environ.get("CLIP_FAST_JIT_EXT", "1") == "0":
        warn_once("the C++ extension is not built and CLIP_FAST_JIT_EXT=0: CPU ops use the slower torch path")
        return None
    try:
        return _jit_build()
    except Exception as exc:  # no compiler, no ninja, headers missing, ...
        warn_once(f"could not build the C++ extension ({type(exc).__name__}: {exc}); CPU ops use the slower torch path")
        return None
