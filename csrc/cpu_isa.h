// Which x86 instruction-set variant the CPU kernels run: the best the processor supports,
// capped by the environment variable CLIP_FAST_CPU_ISA (auto | avx512 | avx2 | baseline),
// read once when the extension loads. The cap exists so one AVX-512 machine can test
// every variant (tests/kernels/test_cpu_isa_variants.py); it never raises the ISA above
// what the processor has.
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace clip_fast {

enum class CpuIsa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa isa_cap_from_env() {
  const char* value = std::getenv("CLIP_FAST_CPU_ISA");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0 || std::strcmp(value, "avx512") == 0)
    return CpuIsa::kAvx512;
  if (std::strcmp(value, "avx2") == 0) return CpuIsa::kAvx2;
  if (std::strcmp(value, "baseline") == 0 || std::strcmp(value, "base") == 0) return CpuIsa::kBase;
  throw std::invalid_argument(std::string("CLIP_FAST_CPU_ISA must be auto, avx512, avx2 or baseline, got '") + value +
                              "'");
}

inline CpuIsa detect_cpu_isa() {
  CpuIsa found = CpuIsa::kBase;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    found = CpuIsa::kAvx512;
  else if (__builtin_cpu_supports("avx2"))
    found = CpuIsa::kAvx2;
#endif
  const CpuIsa cap = isa_cap_from_env();
  return static_cast<int>(found) < static_cast<int>(cap) ? found : cap;
}

}  // namespace clip_fast
