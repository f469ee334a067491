// The Python module of the C++ extension (clip_fast._C from setup.py, clip_fast_C when
// compiled on first use). It has no functions of its own: loading it runs the
// TORCH_LIBRARY_FRAGMENT(clip_fast, ...) blocks of the other files, which register every
// C++ op as torch.ops.clip_fast.*.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "clip_fast C++ ops, registered as torch.ops.clip_fast.*"; }
