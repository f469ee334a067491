// CPU kernel of the SigLIP loss's elementwise work on one (rows x cols) tile of the
// logits (clip_fast/siglip_torch.py: block_torch is the reference). The GEMMs that produce
// the tile (I @ T.T) and consume it (G @ T, G.T @ I) stay in torch (MKL/oneDNN); this
// kernel replaces the torch ops between them, each a pass over the tile (addcmul, neg of
// the diagonal, softplus, sum, sigmoid, neg again, dot, sum), with ONE read and write:
//
//   y  = -z * (scale * dots + bias)     z = +1 on the tile's positive diagonal, else -1
//   loss  += softplus(y) = max(y, 0) + log1p(e^-|y|)
//   g      = -z * sigmoid(y)            written over dots (n * dL/dS; the GEMMs read it)
//   dscale += g * dots,  dbias += g
//
// One exponential e = e^-|y| serves softplus and sigmoid (1 / (1 + e) for y >= 0,
// e / (1 + e) below), so neither overflows for large |S|. NaN and inf propagate as in
// torch: NaN logits give NaN in all three sums; +inf gives softplus inf, g = +-1;
// -inf gives softplus 0, g = 0 and 0 * inf = NaN in dscale (the caller turns any
// non-finite sum into NaN stats).
//
// Sums: each vector lane adds kSumBlock / width terms in fp32, then the block joins a
// double per thread; threads take contiguous row ranges (static split) and their partial
// sums are merged in thread order, so the result depends only on the thread count.
// Instruction sets: AVX-512 intrinsics, AVX2 and baseline auto-vectorised variants,
// picked once at first use (cpu_isa.h, same scheme as contrastive_cpu.cpp).
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"

// GCC (12 here) if-converts the selects of the element formula (the exp clamps, the
// sign of y, the sigmoid branch) only without -ftrapping-math: with it, the loop stays
// scalar and the AVX2/baseline variants run about an order of magnitude slower than
// AVX-512. Scoped to this file's kernels; values are unchanged (no
// reassociation, only FP exception flags become unobservable). Inside this region, no
// std:: math (e.g. std::fabs): GCC does not inline a function compiled with other
// optimisation options, and the call would keep the loop scalar; builtins instead.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#include "vec_math.h"

namespace clip_fast {
namespace siglip_cpu {
namespace {

using namespace vec_math;

constexpr int64_t kSumBlock = 512;
// Tiles below this many elements run on one thread (fork/join costs more).
constexpr int64_t kParallelMin = 1 << 15;

struct Params {
  float scale, bias;
  int64_t diag;  // column offset of the positive pairs: row i's is column i + diag
  bool has_pos;
};

// Rows [r0, r1) of the (M, N) tile D, sums into out[0..2] (loss, dscale, dbias).
CF_INLINE void tile_rows(float* D, int64_t N, int64_t r0, int64_t r1, Params p, double* out) {
  double loss = 0.0, dscale = 0.0, dbias = 0.0;
  for (int64_t i = r0; i < r1; ++i) {
    float* d = D + i * N;
    const int64_t jd = p.has_pos ? i + p.diag : -1;  // may lie outside [0, N): no positive
    for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
      float* dj = d + j0;
      const int32_t n = (int32_t)std::min(N - j0, kSumBlock);
      // int32 positions in the block (SSE2 has no 64-bit lane compare), the positive's
      // clamped to [-1, n]: outside the block it matches no lane
      const int32_t kd = (int32_t)std::max<int64_t>(-1, std::min<int64_t>(jd - j0, n));
      float l = 0.0f, s = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : l, s, b)
      for (int32_t k = 0; k < n; ++k) {
        const float x = dj[k];
        const float sign = k == kd ? -1.0f : 1.0f;  // y = -z S
        const float y = sign * (x * p.scale + p.bias);
        const float e = exp_f32(-__builtin_fabsf(y));
        const float softplus = (y > 0.0f ? y : 0.0f) + log1p_unit_f32(e);
        const float g = sign * ((y >= 0.0f ? 1.0f : e) / (1.0f + e));
        l += softplus;
        s += g * x;
        b += g;
        dj[k] = g;
      }
      loss += l;
      dscale += s;
      dbias += b;
    }
  }
  out[0] = loss;
  out[1] = dscale;
  out[2] = dbias;
}

#define CF_ROW_RANGE                                                    \
  const int64_t nt_ = omp_get_num_threads(), t_ = omp_get_thread_num(); \
  const int64_t r0 = M * t_ / nt_, r1 = M * (t_ + 1) / nt_;

using TileFn = void (*)(float*, int64_t, int64_t, Params, double*);

// The OpenMP region lives in the target-attributed function so that its outlined body
// inherits the instruction set. `part` holds 3 doubles per thread.
#define CF_SIGLIP_VARIANT(ISA, TARGET)                                                     \
  TARGET void tile_##ISA(float* D, int64_t M, int64_t N, Params p, double* part) {         \
    _Pragma("omp parallel if (M * N >= kParallelMin)") {                                    \
      CF_ROW_RANGE                                                                          \
      tile_rows(D, N, r0, r1, p, part + 3 * t_);                                            \
    }                                                                                       \
  }

#if defined(__x86_64__) && defined(__GNUC__)
CF_SIGLIP_VARIANT(avx2, __attribute__((target("avx2"))))
#endif
CF_SIGLIP_VARIANT(base, )

#if defined(__x86_64__) && defined(__GNUC__)
// AVX-512: the same element formula with intrinsics (FMA for scale * x + bias and the
// dscale accumulation, sign flips as masked XORs of the sign bit, vscalefps exp).
CF_TARGET_AVX512 void tile_avx512(float* D, int64_t M, int64_t N, Params p, double* part) {
  _Pragma("omp parallel if (M * N >= kParallelMin)") {
    CF_ROW_RANGE
    const __m512 vscale = _mm512_set1_ps(p.scale), vbias = _mm512_set1_ps(p.bias);
    const __m512 sign_bit = _mm512_set1_ps(-0.0f), zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    double loss = 0.0, dscale = 0.0, dbias = 0.0;
    for (int64_t i = r0; i < r1; ++i) {
      float* d = D + i * N;
      const int64_t jd = p.has_pos ? i + p.diag : -1;
      for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
        const int64_t j1 = std::min(N, j0 + kSumBlock);
        __m512 l = zero, s = zero, b = zero;
        for (int64_t j = j0; j < j1; j += 16) {
          const __mmask16 m = tail_mask(j1 - j);
          const __mmask16 pos = (jd >= j && jd < j + 16) ? (__mmask16)(1u << (jd - j)) : (__mmask16)0;
          const __m512 x = _mm512_maskz_loadu_ps(m, d + j);
          __m512 y = _mm512_fmadd_ps(x, vscale, vbias);
          y = _mm512_mask_xor_ps(y, pos, y, sign_bit);
          const __m512 e = exp16(_mm512_or_ps(y, sign_bit));  // e^-|y|
          // max returns its second operand (0) for NaN y; log1p(NaN) keeps it NaN
          const __m512 softplus = _mm512_add_ps(_mm512_max_ps(y, zero), log1p_unit16(e));
          const __mmask16 nonneg = _mm512_cmp_ps_mask(y, zero, _CMP_GE_OQ);
          __m512 g = _mm512_div_ps(_mm512_mask_blend_ps(nonneg, e, one), _mm512_add_ps(one, e));
          g = _mm512_mask_xor_ps(g, pos, g, sign_bit);
          l = _mm512_mask_add_ps(l, m, l, softplus);
          s = _mm512_mask3_fmadd_ps(g, x, s, m);
          b = _mm512_mask_add_ps(b, m, b, g);
          _mm512_mask_storeu_ps(d + j, m, g);
        }
        loss += _mm512_reduce_add_ps(l);
        dscale += _mm512_reduce_add_ps(s);
        dbias += _mm512_reduce_add_ps(b);
      }
    }
    part[3 * t_] = loss;
    part[3 * t_ + 1] = dscale;
    part[3 * t_ + 2] = dbias;
  }
}
#endif

TileFn pick_tile() {
  const CpuIsa isa = detect_cpu_isa();
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == CpuIsa::kAvx512) return &tile_avx512;
  if (isa == CpuIsa::kAvx2) return &tile_avx2;
#endif
  return &tile_base;
}

TileFn tile_fn() {
  static const TileFn chosen = pick_tile();
  return chosen;
}

// In place: tile <- g; sums (float64, 3) += [sum softplus(y), sum g * tile, sum g].
void siglip_tile(at::Tensor tile, at::Tensor sums, double scale, double bias, int64_t diag, bool has_pos) {
  TORCH_CHECK(tile.device().is_cpu() && tile.scalar_type() == at::kFloat && tile.dim() == 2 && tile.is_contiguous(),
              "tile must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(sums.device().is_cpu() && sums.scalar_type() == at::kDouble && sums.dim() == 1 && sums.size(0) == 3 &&
                  sums.is_contiguous(),
              "sums must be a contiguous float64 CPU tensor of 3 elements");
  const int64_t M = tile.size(0), N = tile.size(1);
  if (M == 0 || N == 0) return;
  const int64_t T = omp_get_max_threads();
  std::vector<double> part((size_t)(3 * T), 0.0);  // threads left without rows add zeros
  tile_fn()(tile.data_ptr<float>(), M, N, Params{(float)scale, (float)bias, diag, has_pos}, part.data());
  double* out = sums.data_ptr<double>();
  for (int64_t t = 0; t < T; ++t)
    for (int k = 0; k < 3; ++k) out[k] += part[3 * t + k];
}

}  // namespace
}  // namespace siglip_cpu
}  // namespace clip_fast

#pragma GCC pop_options

TORCH_LIBRARY_FRAGMENT(clip_fast, m) {
  m.def("siglip_tile(Tensor(a!) tile, Tensor(b!) sums, float scale, float bias, int diag, bool has_pos) -> ()",
        &clip_fast::siglip_cpu::siglip_tile);
}
