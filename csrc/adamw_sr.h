// AdamW with stochastically rounded weights and half-precision moments: the per-element
// arithmetic of the C++ (CPU, OpenMP) implementation.
//
// This header is the executable specification of the algorithm. The Triton kernel
// (kernels/adamw.py) and the pure-torch path (clip_fast/optim.py) implement the same
// operations in the same order, so all of them agree bit for bit given the same random
// bits. Rules that make that possible:
//   * every floating-point operation is a single IEEE-754 fp32 operation with
//     round-to-nearest-even (no fused multiply-add: build with -ffp-contract=off, the
//     Triton launch with enable_fp_fusion=False; no fast-math; correctly rounded sqrt
//     and division);
//   * all roundings to 16-bit formats are integer manipulations of the fp32 bit pattern;
//   * host scalars (betas, lr / bias correction, ...) arrive already rounded to fp32.
//
// Random bits. Element e of a tensor with 64-bit key K uses the Philox4x32-10 block
// (w0, w1, w2, w3) = Philox(counter = (e >> 1, 0, 0, 0), key = K as (low, high) words),
// as kernels/adamw.py's _philox4x32_10 computes it. Even elements take (a, b) = (w0, w1),
// odd elements (w2, w3); a's low 16 bits round the weight, a's high 16 bits the first
// moment, b's low 16 bits the second moment. One Philox call therefore serves two
// elements and every element owns 48 bits that no other element reuses.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#define CF_HD inline __attribute__((always_inline))

// Without -ftrapping-math GCC if-converts the selects of adamw_element (sqrt and division
// computed for every lane, then blended), so the CPU loops vectorise; results are the same
// bits, only floating-point exception flags may differ.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#define CF_POP_OPTIONS 1
#endif

namespace clip_fast {

// Storage formats of parameters, gradients and moments.
enum Kind : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

CF_HD uint32_t f32_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}

CF_HD float bits_f32(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

// ---------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11), word order and key schedule as in Triton.
// ---------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxMulA = 0xD2511F53u;
constexpr uint32_t kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

CF_HD void philox4x32_10(uint64_t counter, uint64_t key, uint32_t& w0, uint32_t& w1, uint32_t& w2,
                         uint32_t& w3) {
  uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    // 32x32 -> 64-bit products; the vectoriser turns these into vpmuludq lanes.
    const uint64_t pa = (uint64_t)kPhiloxMulA * c0;
    const uint64_t pb = (uint64_t)kPhiloxMulB * c2;
    const uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)pb;
    c3 = (uint32_t)pa;
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  w0 = c0;
  w1 = c1;
  w2 = c2;
  w3 = c3;
}

// ---------------------------------------------------------------------------------------
// Decoding 16-bit formats (exact).
// ---------------------------------------------------------------------------------------
CF_HD float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

CF_HD float fp16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  // Subnormal (and zero): mant * 2^-24, exact in fp32.
  const float sub = (float)mant * 5.9604644775390625e-08f;
  const uint32_t normal = ((uint32_t)(h & 0x7FFFu) << 13) + (112u << 23);  // rebias 15 -> 127
  const uint32_t special = 0x7F800000u | (mant << 13);                     // inf / NaN
  const uint32_t mag = exp == 0 ? f32_bits(sub) : (exp == 31 ? special : normal);
  return bits_f32(sign | mag);
}

// ---------------------------------------------------------------------------------------
// Rounding fp32 -> bf16.
// Stochastic rounding: add 16 uniform random bits r to the low half of the fp32 bit
// pattern and truncate. The magnitude rounds away from zero with probability
// (low 16 bits)/2^16, which is exactly the distance to the lower neighbour in units of
// the bf16 spacing, so E[SR(x)] = x; representable values have zero low bits and never
// move; the sign bit is untouched, so SR(-x) = -SR(x) for the same bits.
// Special values: NaN -> quiet NaN (sign and top payload bits kept); +-inf -> +-inf;
// a finite x never becomes inf: the only carry into the inf exponent comes from
// |x| in (max bf16, max fp32], which saturates to +-max bf16 (0x7F7F, 3.3895e38).
// ---------------------------------------------------------------------------------------
// (Written without branches or short-circuit operators so that loops over elements
// if-convert and vectorise.)
CF_HD uint16_t sr_bf16(float x, uint32_t r16) {
  const uint32_t u = f32_bits(x);
  const uint32_t mag = u & 0x7FFFFFFFu;
  uint32_t t = (u + r16) >> 16;
  t -= (uint32_t)(mag < 0x7F800000u) & (uint32_t)((t & 0x7FFFu) == 0x7F80u);
  return (uint16_t)(mag > 0x7F800000u ? ((u >> 16) | 0x0040u) : t);
}

// Round to nearest even (what x.to(torch.bfloat16) does); finite values may overflow to inf.
CF_HD uint16_t rne_bf16(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t t = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? ((u >> 16) | 0x0040u) : t);
}

// ---------------------------------------------------------------------------------------
// Rounding fp32 -> fp16 (used for fp16 moments and fp16 parameters).
// Normal range (|x| >= 2^-14): 13 bits are dropped; SR adds the top 13 random bits to
// them and truncates (exactly unbiased); RNE is the usual carry trick.
// Subnormal range (|x| < 2^-14, fixed spacing 2^-24): y = |x| * 2^24 is exact; SR
// rounds up when r16 < frac(y) * 2^16 (bias below 2^-16 of a spacing), RNE rounds y
// with the 1.5 * 2^23 trick. NaN -> quiet NaN with its sign; +-inf -> +-inf.
// Overflow: SR saturates finite values to +-65504 (0x7BFF), RNE follows IEEE (values
// from 65520 on become inf, as torch's .half() does).
// ---------------------------------------------------------------------------------------
CF_HD uint16_t round_fp16(float x, uint32_t r16, bool stochastic) {
  const uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t mag = u & 0x7FFFFFFFu;
  // normal range
  const uint32_t add = stochastic ? (r16 >> 3) : (0xFFFu + ((mag >> 13) & 1u));
  const uint32_t normal = (((mag + add) & ~0x1FFFu) >> 13) - (112u << 10);
  // subnormal range (y = 0 for the other lanes keeps every conversion in range)
  const bool is_sub = mag < 0x38800000u;
  const float y = bits_f32(is_sub ? mag : 0u) * 16777216.0f;  // |x| * 2^24, exact
  const float k = (float)(uint32_t)y;
  const uint32_t sub = stochastic ? (uint32_t)k + (uint32_t)((float)r16 < (y - k) * 65536.0f)
                                  : (uint32_t)((y + 12582912.0f) - 12582912.0f);
  // overflow, inf, NaN
  const uint32_t overflow_at = stochastic ? 0x477FE000u : 0x477FF000u;  // 65504 (SR) / 65520 (RNE)
  const uint32_t saturated = (mag == 0x7F800000u || !stochastic) ? 0x7C00u : 0x7BFFu;
  uint32_t out = is_sub ? sub : normal;
  out = mag >= overflow_at ? saturated : out;
  out = mag > 0x7F800000u ? 0x7E00u : out;
  return (uint16_t)(sign | out);
}

// ---------------------------------------------------------------------------------------
// Loading and storing one element of a tensor of a given storage kind.
// ---------------------------------------------------------------------------------------
template <int K>
struct Storage;
template <>
struct Storage<kF32> {
  using T = float;
};
template <>
struct Storage<kBF16> {
  using T = uint16_t;
};
template <>
struct Storage<kF16> {
  using T = uint16_t;
};

template <int K>
CF_HD float load_as_f32(typename Storage<K>::T v) {
  if constexpr (K == kF32) return v;
  else if constexpr (K == kBF16) return bf16_to_f32(v);
  else return fp16_to_f32(v);
}

template <int K>
CF_HD typename Storage<K>::T round_to(float x, uint32_t r16, bool stochastic) {
  if constexpr (K == kF32) return x;
  else if constexpr (K == kBF16) return stochastic ? sr_bf16(x, r16) : rne_bf16(x);
  else return round_fp16(x, r16, stochastic);
}

// ---------------------------------------------------------------------------------------
// One AdamW element update, all in fp32. The second moment is kept as its square root
// r = sqrt(v) (see clip_fast/optim.py: it keeps fp16 moments in range); fp16 moments are
// stored multiplied by a per-tensor power of two (decode_scale = 2^-e_old,
// encode_scale = 2^e_new, exact).
// ---------------------------------------------------------------------------------------
struct Hyper {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, decay, eps;
};

struct TensorScalars {
  float step_size;     // lr / (1 - beta1^t)
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^t)
  float decode_scale;  // 2^-e_old (fp16 moments) or 1
  float encode_scale;  // 2^e_new (fp16 moments) or 1
};

// Exponent e of fp16 moments (stored = true value * 2^e) for this step, from the largest
// sqrt(v) of the previous step: puts it in [2^kTargetExp, 2^(kTargetExp+1)); keeps e_old
// when amax is 0, inf or NaN. (The C++ and torch paths compute it on the host with
// clip_fast.optim.next_moment_exp, identically.)
constexpr int kTargetExp = 8;
constexpr int kExpLimit = 100;

CF_HD int next_moment_exp(int e_old, float amax) {
  const int biased = (int)((f32_bits(amax) >> 23) & 0xFFu);
  int e = kTargetExp + 127 - biased;
  e = e < -kExpLimit ? -kExpLimit : (e > kExpLimit ? kExpLimit : e);
  return (amax > 0.0f && biased < 255) ? e : e_old;
}

CF_HD float exp2_int(int e) { return bits_f32((uint32_t)(127 + e) << 23); }  // 2^e, |e| <= 126

// Returns false (and leaves p, m, r as they were) when the gradient is NaN or inf: such
// an element is skipped, parameter and both moments. (Scalars in and out by reference,
// no result struct: the struct would be kept in memory and block vectorisation.)
CF_HD bool adamw_element(float& p, float g, float& m, float& r, const Hyper& h, const TensorScalars& s) {
  const bool finite_grad = (f32_bits(g) & 0x7FFFFFFFu) < 0x7F800000u;
  const float m1 = h.beta1 * m + h.one_minus_beta1 * g;
  const float v1 = h.beta2 * (r * r) + h.one_minus_beta2 * (g * g);
  const float r1 = sqrtf(v1);
  const float denom = r1 * s.inv_sqrt_bc2 + h.eps;
  const float p1 = p * h.decay - s.step_size * (m1 / denom);
  p = finite_grad ? p1 : p;
  m = finite_grad ? m1 : m;
  r = finite_grad ? r1 : r;
  return finite_grad;
}

}  // namespace clip_fast

#if defined(CF_POP_OPTIONS)
#pragma GCC pop_options
#undef CF_POP_OPTIONS
#endif
