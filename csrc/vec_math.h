// Vectorisable fp32 math shared by the CPU loss kernels (contrastive_cpu.cpp,
// siglip_cpu.cpp): e^x and log1p(x) as branch-free scalar functions that the compiler
// vectorises under `omp simd` (AVX2 and baseline variants), and e^x written with
// AVX-512 intrinsics for the AVX-512 variant.
//
// Why hand-written: glibc's vector expf/log1pf are only reached under -ffast-math, which
// the extension does not use (-ffp-contract=off keeps the CPU paths bit-reproducible).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#define CF_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__)
#define CF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#endif

namespace clip_fast {
namespace vec_math {

CF_INLINE uint32_t f32_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

CF_INLINE float bits_f32(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// e^x in fp32, max error ~1 ulp (tests/losses/test_contrastive_cpu_kernels.py measures it
// against fp64 over normal, subnormal and overflow ranges). -inf -> 0, +inf -> inf, NaN -> NaN.
// Cody-Waite reduction by ln2, Cephes polynomial, 2^n built from bits in two factors so
// subnormal results round once.
CF_INLINE float exp_f32(float x) {
  // Clamping keeps NaN (every comparison with it is false). e^-104 rounds to 0 and e^89
  // overflows, so the clamped values still give the right 0 and inf.
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  // n = round(x / ln2) lands in the low mantissa bits of t (1.5 * 2^23 + n); reading the
  // integer from the bits avoids a float -> int conversion (undefined for NaN).
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  const int32_t ni = (int32_t)(f32_bits(t) - 0x4B400000u);
  // r = x - n ln2 with ln2 split in two: ln2_hi has 15 significant bits, so n * ln2_hi
  // (|n| <= 150) is exact; |r| <= ln2 / 2.
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  // Cephes expf polynomial: e^r = 1 + r + r^2 p(r).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n = 2^n1 * 2^n2 with both factors normal for n in [-150, 128]: the first product is
  // exact, the second rounds once (subnormal results included) or overflows to inf.
  const int32_t n1 = ni >> 1;
  const int32_t n2 = ni - n1;
  return p * bits_f32((uint32_t)(n1 + 127) << 23) * bits_f32((uint32_t)(n2 + 127) << 23);
}

// log1p(x) for x in [0, 1] (what softplus needs: x = e^-|y|), ~1-2 ulp; NaN -> NaN.
// log1p(x) = log(m * 2^k) with m = 1 + x for x <= sqrt2 - 1 (k = 0) and m = (1 + x) / 2
// otherwise (k = 1), so that t = m - 1 lies in [sqrt(1/2) - 1, sqrt2 - 1], where the
// Cephes logf polynomial holds: log(1 + t) = t - t^2/2 + t^3 q(t). t is formed without
// rounding 1 + x first: t = x (k = 0) or (x - 1) / 2 (k = 1), which keeps the small-x
// accuracy (log1p(x) ~ x) that log(1 + x) would lose.
CF_INLINE float log1p_unit_f32(float x) {
  const bool big = x > 0.41421356237309515f;  // false for NaN: t = NaN below
  // Both candidates computed, then selected: arithmetic inside the conditional would be
  // if-converted only under -fno-trapping-math and leave the loop scalar.
  const float half = (x - 1.0f) * 0.5f;
  const float t = big ? half : x;
  const float k = big ? 0.693147180559945309f : 0.0f;
  float q = 7.0376836292e-2f;
  q = q * t - 1.1514610310e-1f;
  q = q * t + 1.1676998740e-1f;
  q = q * t - 1.2420140846e-1f;
  q = q * t + 1.4249322787e-1f;
  q = q * t - 1.6668057665e-1f;
  q = q * t + 2.0000714765e-1f;
  q = q * t - 2.4999993993e-1f;
  q = q * t + 3.3333331174e-1f;
  const float z = t * t;
  return (t + (q * t * z - 0.5f * z)) + k;
}

#if defined(__x86_64__) && defined(__GNUC__)
// AVX-512 e^x, same algorithm and constants as exp_f32. The auto-vectorised exp_f32
// needs ~45 instructions per 16 lanes (no FMA under -ffp-contract=off, two scale factors
// for subnormal results, masks for the clamps); here FMA reduction and polynomial, and
// vscalefps, which computes p * 2^n with one rounding over the whole range (subnormal
// results, overflow to inf) in one instruction: ~15 instructions per 16 lanes.
CF_TARGET_AVX512 CF_INLINE __m512 exp16(__m512 x) {
  // max/min return their second operand when either is NaN, so NaN passes through.
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// log1p_unit_f32 for 16 lanes (FMA polynomial; same reduction and constants).
CF_TARGET_AVX512 CF_INLINE __m512 log1p_unit16(__m512 x) {
  const __mmask16 big = _mm512_cmp_ps_mask(x, _mm512_set1_ps(0.41421356237309515f), _CMP_GT_OQ);
  const __m512 t = _mm512_mask_mul_ps(x, big, _mm512_sub_ps(x, _mm512_set1_ps(1.0f)), _mm512_set1_ps(0.5f));
  __m512 q = _mm512_set1_ps(7.0376836292e-2f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.1514610310e-1f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.1676998740e-1f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.2420140846e-1f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.4249322787e-1f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.6668057665e-1f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(2.0000714765e-1f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-2.4999993993e-1f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(3.3333331174e-1f));
  const __m512 z = _mm512_mul_ps(t, t);
  // q t z - z / 2 = z (q t - 1/2)
  const __m512 v = _mm512_mul_ps(z, _mm512_fmsub_ps(q, t, _mm512_set1_ps(0.5f)));
  const __m512 r = _mm512_add_ps(t, v);
  return _mm512_mask_add_ps(r, big, r, _mm512_set1_ps(0.693147180559945309f));
}

CF_TARGET_AVX512 CF_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}
#endif

}  // namespace vec_math
}  // namespace clip_fast
