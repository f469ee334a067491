"""Build script.

The Python packages are plain; `kernels/` is installed as `clip_fast.kernels` and
`csrc/` is shipped as package data (`clip_fast.csrc`) so the C++ extension can be
compiled on first use when it was not built here. The extension itself (`clip_fast._C`)
is built by this script only when torch is importable in the build environment
(`pip install --no-build-isolation ...`); otherwise clip_fast/_ext.py compiles the same
sources with ninja on first use and caches the result.
"""
import glob
import os

from setuptools import setup

packages = [
    "clip_fast",
    "clip_fast.model",
    "clip_fast.data",
    "clip_fast.kernels",
    "clip_fast.csrc",
]
package_dir = {"clip_fast.kernels": "kernels", "clip_fast.csrc": "csrc"}

ext_modules = []
cmdclass = {}
if os.environ.get("CLIP_FAST_BUILD_EXT", "1") != "0":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # isolated build env without torch: compile on first use
        pass
    else:
        cpp_sources = sorted(glob.glob("csrc/*.cpp"))
        if cpp_sources:
            ext_modules.append(
                CppExtension(
                    "clip_fast._C",
                    cpp_sources,
                    include_dirs=[os.path.abspath("csrc")],
                    # Same flags as clip_fast/_ext.py (no FMA contraction: bit-exact paths).
                    extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
                    extra_link_args=["-fopenmp"],
                )
            )
            cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"clip_fast.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
