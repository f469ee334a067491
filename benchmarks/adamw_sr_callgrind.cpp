// Instruction count of the CPU AdamW-SR step per element, independent of machine load:
// one bf16 step (bf16 weights, grads and moments, stochastic rounding, Philox bits) over
// N elements through the same loops the extension runs (csrc/adamw_sr_cpu.h), on one
// thread, counted with callgrind:
//
//   g++ -O3 -fopenmp -ffp-contract=off -fno-math-errno -std=c++17 -Icsrc \
//       benchmarks/adamw_sr_callgrind.cpp -o /tmp/adamw_sr_callgrind
//   OMP_NUM_THREADS=1 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//       --toggle-collect='*update_avx2*' /tmp/adamw_sr_callgrind avx2 1048576
//   callgrind_annotate /tmp/cg.out | head     # instructions / N = instructions per element
//
// (valgrind does not emulate AVX-512; "base" counts the baseline x86-64 variant.)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adamw_sr_cpu.h"

int main(int argc, char** argv) {
  const char* isa = argc > 1 ? argv[1] : "avx2";
  const int64_t n = argc > 2 ? atoll(argv[2]) : (1 << 20);
  std::vector<uint16_t> p(n), g(n), m(n), r(n);
  for (int64_t i = 0; i < n; ++i) {  // finite bf16 bit patterns of typical magnitudes
    p[i] = (uint16_t)(0x3C00u + (i * 2654435761u >> 20) % 0x400u);
    g[i] = (uint16_t)(0x3A00u + (i * 40503u >> 4) % 0x400u);
    m[i] = (uint16_t)(0x3800u + (i * 7919u) % 0x400u);
    r[i] = (uint16_t)(0x3900u + (i * 104729u) % 0x400u);
  }
  using namespace clip_fast;
  const std::vector<TensorArgs> args{{p.data(), g.data(), m.data(), r.data(), nullptr, 0x1234567890ABCDEFull,
                                      TensorScalars{1e-4f, 1.01f, 1.0f, 1.0f}}};
  const std::vector<Chunk> chunks = make_chunks({n});
  const Hyper h{0.9f, 0.1f, 0.98f, 0.02f, 0.99998f, 1e-6f};
  std::vector<int64_t> counts(chunks.size());
  std::vector<float> maxima(chunks.size());
  if (strcmp(isa, "avx2") == 0) update_avx2<kBF16, kBF16, kBF16, true>(args, chunks, h, counts.data(), maxima.data());
  else update_base<kBF16, kBF16, kBF16, true>(args, chunks, h, counts.data(), maxima.data());
  unsigned checksum = 0;
  for (int64_t i = 0; i < n; ++i) checksum = checksum * 31u + p[i] + m[i] + r[i];
  printf("%s n=%lld checksum %08x\n", isa, (long long)n, checksum);
  return 0;
}
