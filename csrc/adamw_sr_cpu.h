// CPU loops (OpenMP, vectorisable, no torch dependency) of AdamW with stochastically rounded
// weights and half-precision moments, and of the stochastic-rounding cast on its own.
// The per-element arithmetic lives in adamw_sr.h.
//
// Work split: every tensor of a call is cut into chunks of kChunk elements; the chunks of
// all tensors form one list that OpenMP threads share, so a parameter group is one call
// whatever the sizes of its tensors. Inside a chunk, blocks of kBlock elements are done
// in two vectorisable passes: Philox fills kBlock (a, b) random words, then the update
// loop reads params/grads/moments once and writes params/moments once (8 bytes read and
// 6 written per element for bf16 weights, bf16 grads and bf16 moments). That all-bf16
// stochastic-rounding update has its own AVX2 loop (update_bf16_sr_avx2, bit-identical to
// the generic one); every other storage combination uses the generic loop.
//
// Instruction sets: the hot loops are compiled for AVX-512, AVX2 and baseline x86-64
// (GCC target attributes) and picked at run time, so one binary is fast everywhere and
// gives identical results everywhere (no FMA contraction: -ffp-contract=off).
#pragma once

#include <stdint.h>

#include <algorithm>
#include <vector>

#include "adamw_sr.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")  // as in adamw_sr.h: lets the update loops vectorise

namespace clip_fast {
namespace {

constexpr int64_t kBlock = 512;         // elements per Philox + update pass (stack buffers)
constexpr int64_t kChunk = 64 * kBlock;  // elements per OpenMP work item

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < (int64_t)numels.size(); ++t)
    for (int64_t b = 0; b < numels[t]; b += kChunk) chunks.push_back({t, b, std::min(numels[t], b + kChunk)});
  return chunks;
}

// Random words (a, b) of elements [base, base + n): Philox(counter = e >> 1), base even.
CF_HD void philox_words(uint64_t key, int64_t base, int64_t n, uint32_t* wa, uint32_t* wb) {
  const int64_t pairs = (n + 1) / 2;
  const uint64_t first = (uint64_t)base >> 1;
  for (int64_t j = 0; j < pairs; ++j) {
    uint32_t w0, w1, w2, w3;
    philox4x32_10(first + (uint64_t)j, key, w0, w1, w2, w3);
    wa[2 * j] = w0;
    wb[2 * j] = w1;
    wa[2 * j + 1] = w2;
    wb[2 * j + 1] = w3;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same words, eight Philox blocks per AVX2 register (one 32-bit lane per counter).
// GCC's own vectorisation of the 32x32 -> 64-bit products widens every lane to 64 bits
// and back; here the high halves come from two vpmuludq (even and odd lanes) and one
// blend, the low halves from vpmullo: ~17 instructions per round for 8 blocks.
#define CF_AVX2 __attribute__((target("avx2"), always_inline)) inline

CF_AVX2 __m256i mulhi_epu32(__m256i a, __m256i mult) {
  const __m256i even = _mm256_mul_epu32(a, mult);                        // 64-bit products of lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), mult);  // and of lanes 1, 3, 5, 7
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// (Not inlined: one call per block of kBlock elements; callable from any variant's loop.)
__attribute__((target("avx2"))) void philox_words_avx2(uint64_t key, int64_t base, int64_t n, uint32_t* wa, uint32_t* wb) {
  const int64_t pairs = (n + 1) / 2;
  const uint64_t first = (uint64_t)base >> 1;
  __m256i k0[10], k1[10];
  for (int round = 0; round < 10; ++round) {
    k0[round] = _mm256_set1_epi32((int)((uint32_t)key + (uint32_t)round * kPhiloxKeyA));
    k1[round] = _mm256_set1_epi32((int)((uint32_t)(key >> 32) + (uint32_t)round * kPhiloxKeyB));
  }
  const __m256i mul_a = _mm256_set1_epi32((int)kPhiloxMulA), mul_b = _mm256_set1_epi32((int)kPhiloxMulB);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j = 0;
  for (; j + 8 <= pairs; j += 8) {
    const uint64_t counter = first + (uint64_t)j;
    if ((uint32_t)counter > 0xFFFFFFFFu - 7u) break;  // low word wraps inside the vector: scalar tail
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)counter), lane);
    __m256i c1 = _mm256_set1_epi32((int)(uint32_t)(counter >> 32));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    for (int round = 0; round < 10; ++round) {
      const __m256i hi_a = mulhi_epu32(c0, mul_a), lo_a = _mm256_mullo_epi32(c0, mul_a);
      const __m256i hi_b = mulhi_epu32(c2, mul_b), lo_b = _mm256_mullo_epi32(c2, mul_b);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), k0[round]);
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), k1[round]);
      c1 = lo_b;
      c3 = lo_a;
    }
    // element 2j + 2l takes (w0, w1) of lane l, element 2j + 2l + 1 takes (w2, w3)
    const __m256i a_lo = _mm256_unpacklo_epi32(c0, c2), a_hi = _mm256_unpackhi_epi32(c0, c2);
    const __m256i b_lo = _mm256_unpacklo_epi32(c1, c3), b_hi = _mm256_unpackhi_epi32(c1, c3);
    _mm256_storeu_si256((__m256i*)(wa + 2 * j), _mm256_permute2x128_si256(a_lo, a_hi, 0x20));
    _mm256_storeu_si256((__m256i*)(wa + 2 * j + 8), _mm256_permute2x128_si256(a_lo, a_hi, 0x31));
    _mm256_storeu_si256((__m256i*)(wb + 2 * j), _mm256_permute2x128_si256(b_lo, b_hi, 0x20));
    _mm256_storeu_si256((__m256i*)(wb + 2 * j + 8), _mm256_permute2x128_si256(b_lo, b_hi, 0x31));
  }
  philox_words(key, base + 2 * j, n - 2 * j, wa + 2 * j, wb + 2 * j);
}
// The all-bf16 stochastic-rounding update (bf16 weights, grads and moments: the common
// case) written with AVX2 intrinsics, 16 elements per iteration. The same IEEE operations
// in the same order as adamw_element + sr_bf16 (so bit-identical to them), minus what
// GCC's own vectorisation of the generic loop spends on 32 -> 16-bit narrowing (a mask per
// vector before vpackusdw, needless here: every rounded lane is already <= 0xFFFF).
// Returns how many leading elements of [0, n) it did (a multiple of 16) and adds their
// non-finite gradient count to *nonfinite.
CF_AVX2 __m256i load_bf16x8(const uint16_t* x) {
  return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)x)), 16);
}

CF_AVX2 __m256i sr_bf16x8(__m256 x, __m256i r16) {  // sr_bf16 on eight lanes
  const __m256i u = _mm256_castps_si256(x);
  const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
  __m256i t = _mm256_srli_epi32(_mm256_add_epi32(u, r16), 16);
  const __m256i finite = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x7F800000), mag);
  const __m256i at_inf =
      _mm256_cmpeq_epi32(_mm256_and_si256(t, _mm256_set1_epi32(0x7FFF)), _mm256_set1_epi32(0x7F80));
  t = _mm256_add_epi32(t, _mm256_and_si256(finite, at_inf));  // mask -1: one step back to max bf16
  const __m256i is_nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7F800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x0040));
  return _mm256_blendv_epi8(t, quiet, is_nan);
}

CF_AVX2 void store_bf16x16(uint16_t* y, __m256i lo, __m256i hi) {  // lanes hold values <= 0xFFFF
  _mm256_storeu_si256((__m256i*)y, _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8));
}

struct Bf16x8 {
  __m256i p, m, r, finite;
};

CF_AVX2 Bf16x8 adamw_sr_bf16x8(const uint16_t* p, const uint16_t* g, const uint16_t* m, const uint16_t* r,
                               const uint32_t* wa, const uint32_t* wb, const Hyper& h, const TensorScalars& s) {
  const __m256i gbits = load_bf16x8(g);
  const __m256 pv = _mm256_castsi256_ps(load_bf16x8(p)), gv = _mm256_castsi256_ps(gbits);
  const __m256 mv = _mm256_castsi256_ps(load_bf16x8(m)), rv = _mm256_castsi256_ps(load_bf16x8(r));
  const __m256i finite = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x7F800000),
                                            _mm256_and_si256(gbits, _mm256_set1_epi32(0x7FFFFFFF)));
  const __m256 m1 = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(h.beta1), mv),
                                  _mm256_mul_ps(_mm256_set1_ps(h.one_minus_beta1), gv));
  const __m256 v1 = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(h.beta2), _mm256_mul_ps(rv, rv)),
                                  _mm256_mul_ps(_mm256_set1_ps(h.one_minus_beta2), _mm256_mul_ps(gv, gv)));
  const __m256 r1 = _mm256_sqrt_ps(v1);
  const __m256 denom = _mm256_add_ps(_mm256_mul_ps(r1, _mm256_set1_ps(s.inv_sqrt_bc2)), _mm256_set1_ps(h.eps));
  const __m256 p1 = _mm256_sub_ps(_mm256_mul_ps(pv, _mm256_set1_ps(h.decay)),
                                  _mm256_mul_ps(_mm256_set1_ps(s.step_size), _mm256_div_ps(m1, denom)));
  const __m256 keep = _mm256_castsi256_ps(finite);
  const __m256i ra = _mm256_load_si256((const __m256i*)wa), rb = _mm256_load_si256((const __m256i*)wb);
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  return {sr_bf16x8(_mm256_blendv_ps(pv, p1, keep), _mm256_and_si256(ra, low16)),
          sr_bf16x8(_mm256_blendv_ps(mv, m1, keep), _mm256_srli_epi32(ra, 16)),
          sr_bf16x8(_mm256_blendv_ps(rv, r1, keep), _mm256_and_si256(rb, low16)), finite};
}

// wa, wb: 32-byte aligned (the stack buffers of update_range).
__attribute__((target("avx2"))) int64_t update_bf16_sr_avx2(uint16_t* p, const uint16_t* g, uint16_t* m, uint16_t* r,
                                                            const uint32_t* wa, const uint32_t* wb, int64_t n,
                                                            const Hyper& h, const TensorScalars& s,
                                                            int64_t* nonfinite) {
  __m256i finite_count = _mm256_setzero_si256();  // minus the finite lanes seen (masks are -1)
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const Bf16x8 lo = adamw_sr_bf16x8(p + i, g + i, m + i, r + i, wa + i, wb + i, h, s);
    const Bf16x8 hi = adamw_sr_bf16x8(p + i + 8, g + i + 8, m + i + 8, r + i + 8, wa + i + 8, wb + i + 8, h, s);
    store_bf16x16(p + i, lo.p, hi.p);
    store_bf16x16(m + i, lo.m, hi.m);
    store_bf16x16(r + i, lo.r, hi.r);
    finite_count = _mm256_add_epi32(finite_count, _mm256_add_epi32(lo.finite, hi.finite));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256((__m256i*)lanes, finite_count);
  int64_t finite = 0;
  for (int l = 0; l < 8; ++l) finite -= lanes[l];  // <= kBlock / 8 per lane: no int32 overflow
  *nonfinite += i - finite;
  return i;
}
#endif

// Philox words with the vector code where the instruction set has it.
template <bool kAvx2>
CF_HD void random_words_for(uint64_t key, int64_t base, int64_t n, uint32_t* wa, uint32_t* wb) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (kAvx2) {
    philox_words_avx2(key, base, n, wa, wb);
    return;
  }
#endif
  philox_words(key, base, n, wa, wb);
}

CF_HD void explicit_words(const int32_t* rand, int64_t base, int64_t n, uint32_t* wa, uint32_t* wb) {
  for (int64_t i = 0; i < n; ++i) {
    wa[i] = (uint32_t)rand[2 * (base + i)];
    wb[i] = (uint32_t)rand[2 * (base + i) + 1];
  }
}

struct TensorArgs {
  void* p;
  const void* g;
  void* m;
  void* r;
  const int32_t* rand;  // nullptr: Philox
  uint64_t key;
  TensorScalars s;
};

// Updates elements [begin, end) of one tensor; returns the non-finite gradient count and
// accumulates the max of the new sqrt(v) (fp16 moments only).
template <int PK, int GK, int SK, bool SR, bool kAvx2>
CF_HD int64_t update_range(const TensorArgs& a, const Hyper& h, int64_t begin, int64_t end, float& amax) {
  using PT = typename Storage<PK>::T;
  using GT = typename Storage<GK>::T;
  using ST = typename Storage<SK>::T;
  PT* __restrict__ p = static_cast<PT*>(a.p);
  const GT* __restrict__ g = static_cast<const GT*>(a.g);
  ST* __restrict__ m = static_cast<ST*>(a.m);
  ST* __restrict__ r = static_cast<ST*>(a.r);
  alignas(64) uint32_t wa[kBlock];
  alignas(64) uint32_t wb[kBlock];
  int64_t nonfinite = 0;
  float local_max = amax;
  constexpr bool kPStochastic = SR && PK == kBF16;  // fp16 / fp32 weights: plain rounding
  for (int64_t base = begin; base < end; base += kBlock) {
    const int64_t n = std::min(kBlock, end - base);
    if (a.rand != nullptr) explicit_words(a.rand, base, n, wa, wb);
    else if (SR) random_words_for<kAvx2>(a.key, base, n, wa, wb);
    int64_t i0 = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (kAvx2 && SR && PK == kBF16 && GK == kBF16 && SK == kBF16)
      i0 = update_bf16_sr_avx2(p + base, g + base, m + base, r + base, wa, wb, n, h, a.s, &nonfinite);
#endif
    for (int64_t i = i0; i < n; ++i) {
      const int64_t e = base + i;
      float pi = load_as_f32<PK>(p[e]);
      float mi = load_as_f32<SK>(m[e]);
      float ri = load_as_f32<SK>(r[e]);
      if constexpr (SK == kF16) {
        mi *= a.s.decode_scale;
        ri *= a.s.decode_scale;
      }
      const bool finite = adamw_element(pi, load_as_f32<GK>(g[e]), mi, ri, h, a.s);
      if constexpr (SK == kF16) {
        local_max = std::max(local_max, ri);
        mi *= a.s.encode_scale;
        ri *= a.s.encode_scale;
      }
      const uint32_t ra = SR ? wa[i] : 0u, rb = SR ? wb[i] : 0u;
      p[e] = round_to<PK>(pi, ra & 0xFFFFu, kPStochastic);
      m[e] = round_to<SK>(mi, ra >> 16, SR);
      r[e] = round_to<SK>(ri, rb & 0xFFFFu, SR);
      nonfinite += finite ? 0 : 1;
    }
  }
  amax = local_max;
  return nonfinite;
}

template <bool kAvx2>
CF_HD void sr_range(const float* x, uint16_t* y, const int32_t* rand, uint64_t key, int64_t begin, int64_t end) {
  alignas(64) uint32_t wa[kBlock];
  alignas(64) uint32_t wb[kBlock];
  for (int64_t base = begin; base < end; base += kBlock) {
    const int64_t n = std::min(kBlock, end - base);
    if (rand != nullptr)
      for (int64_t i = 0; i < n; ++i) wa[i] = (uint32_t)rand[base + i];
    else
      random_words_for<kAvx2>(key, base, n, wa, wb);
    for (int64_t i = 0; i < n; ++i) y[base + i] = sr_bf16(x[base + i], wa[i] & 0xFFFFu);
  }
}

// ---------------------------------------------------------------------------------------
// Instruction-set variants of the hot loops (everything above is inlined into them).
// ---------------------------------------------------------------------------------------
using UpdateFn = void (*)(const std::vector<TensorArgs>&, const std::vector<Chunk>&, const Hyper&, int64_t*, float*);
using SrFn = void (*)(const float*, uint16_t*, const int32_t*, uint64_t, int64_t);

// The OpenMP loops sit in these functions (not in an inlined helper) so that the outlined
// parallel bodies inherit the target attribute.
#define CF_ISA_VARIANTS(ISA_NAME, TARGET, AVX2)                                                                      \
  template <int PK, int GK, int SK, bool SR>                                                                 \
  TARGET void update_##ISA_NAME(const std::vector<TensorArgs>& args, const std::vector<Chunk>& chunks,      \
                                const Hyper& h, int64_t* counts, float* maxima) {                            \
    _Pragma("omp parallel for schedule(dynamic, 4) if (chunks.size() > 1)")                                                    \
    for (int64_t c = 0; c < (int64_t)chunks.size(); ++c) {                                                   \
      float amax = 0.0f;                                                                                     \
      counts[c] = update_range<PK, GK, SK, SR, AVX2>(args[chunks[c].tensor], h, chunks[c].begin, chunks[c].end,   \
                                               amax);                                                        \
      maxima[c] = amax;                                                                                      \
    }                                                                                                        \
  }                                                                                                          \
  TARGET void sr_##ISA_NAME(const float* x, uint16_t* y, const int32_t* rand, uint64_t key, int64_t numel) { \
    _Pragma("omp parallel for schedule(static) if (numel > kChunk)")                                                     \
    for (int64_t b = 0; b < numel; b += kChunk) sr_range<AVX2>(x, y, rand, key, b, std::min(numel, b + kChunk));  \
  }

#if defined(__x86_64__) && defined(__GNUC__)
CF_ISA_VARIANTS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi2"))), true)
CF_ISA_VARIANTS(avx2, __attribute__((target("avx2,bmi2"))), true)
#endif
CF_ISA_VARIANTS(base, , false)

}  // namespace
}  // namespace clip_fast

#pragma GCC pop_options
