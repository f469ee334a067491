// CPU kernels of the contrastive loss's elementwise work on one (rows x N) block of the
// logits S (clip_fast/contrastive_cpp.py: block_lse, block_grad, block_softmaxes). The GEMMs that
// produce and consume the block stay in torch (MKL/oneDNN, at the machine's fp32 peak);
// what these kernels replace are the chains of torch ops between them, each a full pass
// over a 32 MiB block (amax twice, sub, exp, two sums forward; add, sub, exp, mul
// backward). Here the forward reads the block twice (maxima, then exponentials with both
// sums) and writes nothing; the backward reads and writes it once.
//
// Semantics are the torch functions' (contrastive_torch.py is the reference): one exponential shifted
// by the block's largest logit `top` serves both directions when every row and column
// maximum lies within `shift_range` of it, otherwise the caller's per-direction path
// runs. NaN anywhere makes that test fail exactly as torch's comparison with NaN does.
//
// exp: glibc's vector expf is only reached under -ffast-math, so exp_f32 (vec_math.h) is a
// branch-free expf the compiler vectorises (Cody-Waite reduction by ln2, Cephes
// polynomial, 2^n built from bits in two factors so subnormal results round once).
//
// Threads: OpenMP over rows with a static split (contiguous row ranges). Column
// reductions go to one partial array per thread, merged in thread order afterwards, so
// a result depends only on the thread count, not on scheduling.
// Instruction sets: AVX-512, AVX2 and baseline x86-64 variants via target attributes,
// picked once at load (same scheme as adamw_sr.cpp).
#include <torch/extension.h>

#include "cpu_isa.h"

#include <omp.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

// As in siglip_cpu.cpp: without -ftrapping-math GCC if-converts the selects of the
// element loops (exp clamps, maxima), so the AVX2 and baseline variants vectorise too
// (they ran 8-15x slower than AVX-512 scalar); results are unchanged (no reassociation,
// only FP exception flags become unobservable). No std:: math inside the region: a
// function compiled with other options is not inlined and would keep a loop scalar.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#include "vec_math.h"

namespace clip_fast {
namespace contrastive_cpu {
namespace {

using namespace vec_math;  // exp_f32, exp16, tail_mask (shared with siglip_cpu.cpp)

// Columns per partial row sum: each of the vector lanes adds kSumBlock / width numbers
// in sequence, then the block's sum joins a double accumulator, so rounding error stays
// that of ~32 additions at any N.
constexpr int64_t kSumBlock = 512;
// Blocks below this many elements run on one thread (fork/join costs more).
constexpr int64_t kParallelMin = 1 << 15;

// ---------------------------------------------------------------------------------------
// Row-range bodies (inlined into the ISA variants below).
// ---------------------------------------------------------------------------------------

// Row maxima of rows [r0, r1), running column maxima in `col_max`, NaN count in `bad`.
// Maxima ignore NaN; the flag records it (the caller then takes the per-direction path).
CF_INLINE void max_rows(const float* S, int64_t N, int64_t r0, int64_t r1, float* row_max, float* col_max,
                        int& bad) {
  int nan = 0;
  for (int64_t i = r0; i < r1; ++i) {
    const float* s = S + i * N;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t j = 0; j < N; ++j) {
      const float x = s[j];
      m = x > m ? x : m;
      col_max[j] = x > col_max[j] ? x : col_max[j];
      nan |= (x != x);
    }
    row_max[i] = m;
  }
  bad |= nan;
}

// Row sums of exp(S - top) over rows [r0, r1) (double), column sums added to `col_sum`.
CF_INLINE void expsum_rows(const float* S, int64_t N, int64_t r0, int64_t r1, float top, double* row_sum,
                           float* col_sum) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* s = S + i * N;
    double total = 0.0;
    for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
      const int64_t j1 = std::min(N, j0 + kSumBlock);
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = j0; j < j1; ++j) {
        const float e = exp_f32(s[j] - top);
        acc += e;
        col_sum[j] += e;
      }
      total += acc;
    }
    row_sum[i] = total;
  }
}

// S <- exp(S - top) * (u_i + v_j)   (shared shift) on rows [r0, r1).
CF_INLINE void grad_shared_rows(float* S, int64_t N, int64_t r0, int64_t r1, float top, const float* u,
                                const float* v) {
  for (int64_t i = r0; i < r1; ++i) {
    float* s = S + i * N;
    const float ui = u[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) s[j] = (ui + v[j]) * exp_f32(s[j] - top);
  }
}

// S <- exp(S - r_i) + exp(S - c_j)   (one exponential per direction).
CF_INLINE void grad_wide_rows(float* S, int64_t N, int64_t r0, int64_t r1, const float* r, const float* c) {
  for (int64_t i = r0; i < r1; ++i) {
    float* s = S + i * N;
    const float ri = r[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) s[j] = exp_f32(s[j] - ri) + exp_f32(s[j] - c[j]);
  }
}

// S <- exp(S - top) * u_i, W <- exp(S - top) * v_j   (split mode, shared shift).
CF_INLINE void softmax_shared_rows(float* S, float* W, int64_t N, int64_t r0, int64_t r1, float top,
                                   const float* u, const float* v) {
  for (int64_t i = r0; i < r1; ++i) {
    float* s = S + i * N;
    float* w = W + i * N;
    const float ui = u[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const float e = exp_f32(s[j] - top);
      w[j] = e * v[j];
      s[j] = e * ui;
    }
  }
}

// S <- exp(S - r_i), W <- exp(S - c_j)   (split mode, one exponential per direction).
CF_INLINE void softmax_wide_rows(float* S, float* W, int64_t N, int64_t r0, int64_t r1, const float* r,
                                 const float* c) {
  for (int64_t i = r0; i < r1; ++i) {
    float* s = S + i * N;
    float* w = W + i * N;
    const float ri = r[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      w[j] = exp_f32(s[j] - c[j]);
      s[j] = exp_f32(s[j] - ri);
    }
  }
}

// y[k] = exp(top - x[k]) (u and v of the shared shift).
CF_INLINE void exp_offsets(const float* x, int64_t n, float top, float* y) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] = exp_f32(top - x[k]);
}

// ---------------------------------------------------------------------------------------
// ISA variants: the OpenMP regions live in these functions (not in an inlined helper) so
// that the outlined parallel bodies inherit the target attribute. Each thread takes a
// contiguous range of rows; per-thread column arrays are indexed by thread number.
// ---------------------------------------------------------------------------------------
struct Ops {
  void (*max)(const float*, int64_t, int64_t, float*, float*, int*);
  void (*expsum)(const float*, int64_t, int64_t, float, double*, float*);
  void (*grad_shared)(float*, int64_t, int64_t, float, const float*, const float*);
  void (*grad_wide)(float*, int64_t, int64_t, const float*, const float*);
  void (*softmax_shared)(float*, float*, int64_t, int64_t, float, const float*, const float*);
  void (*softmax_wide)(float*, float*, int64_t, int64_t, const float*, const float*);
  void (*offsets)(const float*, int64_t, float, float*);
};

#define CF_ROW_RANGE                                                           \
  const int64_t nt_ = omp_get_num_threads(), t_ = omp_get_thread_num();        \
  const int64_t r0 = M * t_ / nt_, r1 = M * (t_ + 1) / nt_;

#define CF_CONTRASTIVE_VARIANTS(ISA, TARGET)                                                                   \
  TARGET void max_##ISA(const float* S, int64_t M, int64_t N, float* row_max, float* col_max, int* bad) {       \
    _Pragma("omp parallel if (M * N >= kParallelMin)") {                                                        \
      CF_ROW_RANGE                                                                                              \
      max_rows(S, N, r0, r1, row_max, col_max + t_ * N, bad[t_]);                                               \
    }                                                                                                           \
  }                                                                                                             \
  TARGET void expsum_##ISA(const float* S, int64_t M, int64_t N, float top, double* row_sum, float* col_sum) {  \
    _Pragma("omp parallel if (M * N >= kParallelMin)") {                                                        \
      CF_ROW_RANGE                                                                                              \
      expsum_rows(S, N, r0, r1, top, row_sum, col_sum + t_ * N);                                                \
    }                                                                                                           \
  }                                                                                                             \
  TARGET void grad_shared_##ISA(float* S, int64_t M, int64_t N, float top, const float* u, const float* v) {    \
    _Pragma("omp parallel if (M * N >= kParallelMin)") {                                                        \
      CF_ROW_RANGE                                                                                              \
      grad_shared_rows(S, N, r0, r1, top, u, v);                                                                \
    }                                                                                                           \
  }                                                                                                             \
  TARGET void grad_wide_##ISA(float* S, int64_t M, int64_t N, const float* r, const float* c) {                 \
    _Pragma("omp parallel if (M * N >= kParallelMin)") {                                                        \
      CF_ROW_RANGE                                                                                              \
      grad_wide_rows(S, N, r0, r1, r, c);                                                                       \
    }                                                                                                           \
  }                                                                                                             \
  TARGET void softmax_shared_##ISA(float* S, float* W, int64_t M, int64_t N, float top, const float* u,         \
                                   const float* v) {                                                            \
    _Pragma("omp parallel if (M * N >= kParallelMin)") {                                                        \
      CF_ROW_RANGE                                                                                              \
      softmax_shared_rows(S, W, N, r0, r1, top, u, v);                                                          \
    }                                                                                                           \
  }                                                                                                             \
  TARGET void softmax_wide_##ISA(float* S, float* W, int64_t M, int64_t N, const float* r, const float* c) {    \
    _Pragma("omp parallel if (M * N >= kParallelMin)") {                                                        \
      CF_ROW_RANGE                                                                                              \
      softmax_wide_rows(S, W, N, r0, r1, r, c);                                                                 \
    }                                                                                                           \
  }                                                                                                             \
  TARGET void offsets_##ISA(const float* x, int64_t n, float top, float* y) { exp_offsets(x, n, top, y); }      \
  constexpr Ops kGeneric_##ISA = {&max_##ISA,           &expsum_##ISA,       &grad_shared_##ISA, &grad_wide_##ISA, \
                                  &softmax_shared_##ISA, &softmax_wide_##ISA, &offsets_##ISA};

#if defined(__x86_64__) && defined(__GNUC__)
CF_CONTRASTIVE_VARIANTS(avx512, CF_TARGET_AVX512)
CF_CONTRASTIVE_VARIANTS(avx2, __attribute__((target("avx2"))))
#endif
CF_CONTRASTIVE_VARIANTS(base, )

#if defined(__x86_64__) && defined(__GNUC__)
// ---------------------------------------------------------------------------------------
// AVX-512 exponential passes, written with intrinsics around exp16 (vec_math.h): FMA
// reduction and polynomial and vscalefps make it ~15 instructions per 16 lanes, where
// the auto-vectorised exp_f32 needs ~45 and made these passes compute-bound.
// ---------------------------------------------------------------------------------------
CF_TARGET_AVX512 void expsum_avx512i(const float* S, int64_t M, int64_t N, float top, double* row_sum,
                                     float* col_sum) {
  _Pragma("omp parallel if (M * N >= kParallelMin)") {
    CF_ROW_RANGE
    float* cs = col_sum + t_ * N;
    const __m512 vtop = _mm512_set1_ps(top);
    for (int64_t i = r0; i < r1; ++i) {
      const float* s = S + i * N;
      double total = 0.0;
      for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
        const int64_t j1 = std::min(N, j0 + kSumBlock);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = j0; j < j1; j += 16) {
          const __mmask16 m = tail_mask(j1 - j);
          const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vtop)));
          acc = _mm512_add_ps(acc, e);
          _mm512_mask_storeu_ps(cs + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, cs + j), e));
        }
        total += _mm512_reduce_add_ps(acc);
      }
      row_sum[i] = total;
    }
  }
}

CF_TARGET_AVX512 void grad_shared_avx512i(float* S, int64_t M, int64_t N, float top, const float* u,
                                          const float* v) {
  _Pragma("omp parallel if (M * N >= kParallelMin)") {
    CF_ROW_RANGE
    const __m512 vtop = _mm512_set1_ps(top);
    for (int64_t i = r0; i < r1; ++i) {
      float* s = S + i * N;
      const __m512 ui = _mm512_set1_ps(u[i]);
      for (int64_t j = 0; j < N; j += 16) {
        const __mmask16 m = tail_mask(N - j);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vtop));
        _mm512_mask_storeu_ps(s + j, m, _mm512_mul_ps(_mm512_add_ps(ui, _mm512_maskz_loadu_ps(m, v + j)), e));
      }
    }
  }
}

CF_TARGET_AVX512 void grad_wide_avx512i(float* S, int64_t M, int64_t N, const float* r, const float* c) {
  _Pragma("omp parallel if (M * N >= kParallelMin)") {
    CF_ROW_RANGE
    for (int64_t i = r0; i < r1; ++i) {
      float* s = S + i * N;
      const __m512 ri = _mm512_set1_ps(r[i]);
      for (int64_t j = 0; j < N; j += 16) {
        const __mmask16 m = tail_mask(N - j);
        const __m512 x = _mm512_maskz_loadu_ps(m, s + j);
        const __m512 g = _mm512_add_ps(exp16(_mm512_sub_ps(x, ri)),
                                       exp16(_mm512_sub_ps(x, _mm512_maskz_loadu_ps(m, c + j))));
        _mm512_mask_storeu_ps(s + j, m, g);
      }
    }
  }
}

CF_TARGET_AVX512 void softmax_shared_avx512i(float* S, float* W, int64_t M, int64_t N, float top, const float* u,
                                             const float* v) {
  _Pragma("omp parallel if (M * N >= kParallelMin)") {
    CF_ROW_RANGE
    const __m512 vtop = _mm512_set1_ps(top);
    for (int64_t i = r0; i < r1; ++i) {
      float* s = S + i * N;
      float* w = W + i * N;
      const __m512 ui = _mm512_set1_ps(u[i]);
      for (int64_t j = 0; j < N; j += 16) {
        const __mmask16 m = tail_mask(N - j);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vtop));
        _mm512_mask_storeu_ps(w + j, m, _mm512_mul_ps(e, _mm512_maskz_loadu_ps(m, v + j)));
        _mm512_mask_storeu_ps(s + j, m, _mm512_mul_ps(e, ui));
      }
    }
  }
}

CF_TARGET_AVX512 void softmax_wide_avx512i(float* S, float* W, int64_t M, int64_t N, const float* r,
                                           const float* c) {
  _Pragma("omp parallel if (M * N >= kParallelMin)") {
    CF_ROW_RANGE
    for (int64_t i = r0; i < r1; ++i) {
      float* s = S + i * N;
      float* w = W + i * N;
      const __m512 ri = _mm512_set1_ps(r[i]);
      for (int64_t j = 0; j < N; j += 16) {
        const __mmask16 m = tail_mask(N - j);
        const __m512 x = _mm512_maskz_loadu_ps(m, s + j);
        _mm512_mask_storeu_ps(w + j, m, exp16(_mm512_sub_ps(x, _mm512_maskz_loadu_ps(m, c + j))));
        _mm512_mask_storeu_ps(s + j, m, exp16(_mm512_sub_ps(x, ri)));
      }
    }
  }
}

CF_TARGET_AVX512 void offsets_avx512i(const float* x, int64_t n, float top, float* y) {
  const __m512 vtop = _mm512_set1_ps(top);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    _mm512_mask_storeu_ps(y + k, m, exp16(_mm512_sub_ps(vtop, _mm512_maskz_loadu_ps(m, x + k))));
  }
}

// The maxima pass is memory-bound: the auto-vectorised loop is as fast as intrinsics.
constexpr Ops kOps_avx512 = {&max_avx512,          &expsum_avx512i,       &grad_shared_avx512i, &grad_wide_avx512i,
                             &softmax_shared_avx512i, &softmax_wide_avx512i, &offsets_avx512i};
#endif

const Ops& pick_ops() {
  const CpuIsa isa = detect_cpu_isa();
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == CpuIsa::kAvx512) return kOps_avx512;
  if (isa == CpuIsa::kAvx2) return kGeneric_avx2;
#endif
  return kGeneric_base;
}

const Ops& ops() {
  static const Ops& chosen = pick_ops();
  return chosen;
}

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------
// Tensor-level ops (registered below as torch.ops.clip_fast.*).
// ---------------------------------------------------------------------------------------
void check_block(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D (rows, N), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

void check_vector(const at::Tensor& x, int64_t n, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 1 && x.size(0) == n &&
                  x.is_contiguous(),
              name, " must be a contiguous float32 CPU vector of ", n, " elements");
}

// Largest and smallest element, both NaN if any element is (as torch's max and min).
std::pair<float, float> max_min(const float* x, int64_t n) {
  float hi = -std::numeric_limits<float>::infinity(), lo = std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t k = 0; k < n; ++k) {
    nan |= std::isnan(x[k]);
    hi = std::max(hi, x[k]);
    lo = std::min(lo, x[k]);
  }
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  return {nan ? qnan : hi, nan ? qnan : lo};
}

// The shared-shift test of contrastive_torch.py: top - min(a) < range and top - min(b) < range, false
// for NaN (comparisons with NaN are false in torch and C++ alike).
bool shared_shift(float top, float a_min, float b_min, double range) {
  const float rf = (float)range;
  return (top - a_min < rf) && (top - b_min < rf);
}

// Row and column logsumexp of a (M, N) block with the shared shift, without modifying it.
// Returns (row_lse (M,), col_lse (N,), true), or (empty, empty, false) when the shift does
// not apply (wide range, NaN, inf): the caller then runs torch.logsumexp per direction.
std::tuple<at::Tensor, at::Tensor, bool> block_lse(const at::Tensor& S, double shift_range) {
  check_block(S, "logits");
  const int64_t M = S.size(0), N = S.size(1);
  TORCH_CHECK(M > 0 && N > 0, "logits must be non-empty");
  const float* s = S.data_ptr<float>();
  const int64_t T = omp_get_max_threads();
  const float ninf = -std::numeric_limits<float>::infinity();
  at::Tensor row_lse = at::empty({M}, S.options());
  float* row_max = row_lse.data_ptr<float>();  // maxima first, then the results
  std::vector<float> col_part((size_t)(T * N), ninf);
  std::vector<int> bad((size_t)T, 0);
  ops().max(s, M, N, row_max, col_part.data(), bad.data());
  std::vector<float> col_max(col_part.begin(), col_part.begin() + N);
  for (int64_t t = 1; t < T; ++t)
    for (int64_t j = 0; j < N; ++j) col_max[j] = std::max(col_max[j], col_part[t * N + j]);
  const bool nan = std::any_of(bad.begin(), bad.end(), [](int b) { return b != 0; });
  auto [top, row_min] = max_min(row_max, M);
  const float col_min = max_min(col_max.data(), N).second;
  if (nan || !shared_shift(top, row_min, col_min, shift_range))
    return {at::empty({0}, S.options()), at::empty({0}, S.options()), false};

  std::vector<double> row_sum((size_t)M);
  std::fill(col_part.begin(), col_part.end(), 0.0f);
  ops().expsum(s, M, N, top, row_sum.data(), col_part.data());
  at::Tensor col_lse = at::empty({N}, S.options());
  float* cl = col_lse.data_ptr<float>();
  for (int64_t j = 0; j < N; ++j) {
    double sum = 0.0;
    for (int64_t t = 0; t < T; ++t) sum += col_part[t * N + j];
    cl[j] = (float)(std::log(sum) + (double)top);
  }
  float* rl = row_lse.data_ptr<float>();
  for (int64_t i = 0; i < M; ++i) rl[i] = (float)(std::log(row_sum[i]) + (double)top);
  return {row_lse, col_lse, true};
}

struct Shift {
  bool shared;
  float top;
  std::vector<float> u, v;  // exp(top - row_lse), exp(top - col_lse) when shared
};

Shift shift_of(const at::Tensor& row_lse, const at::Tensor& col_lse, double shift_range) {
  const float* r = row_lse.data_ptr<float>();
  const float* c = col_lse.data_ptr<float>();
  const int64_t M = row_lse.size(0), N = col_lse.size(0);
  auto [top, r_min] = max_min(r, M);
  const float c_min = max_min(c, N).second;
  Shift sh{shared_shift(top, r_min, c_min, shift_range), top, {}, {}};
  if (sh.shared) {
    sh.u.resize((size_t)M);
    sh.v.resize((size_t)N);
    ops().offsets(r, M, top, sh.u.data());
    ops().offsets(c, N, top, sh.v.data());
  }
  return sh;
}

// In place: S <- exp(S - row_lse[:, None]) + exp(S - col_lse[None, :]).
void block_grad(at::Tensor S, const at::Tensor& row_lse, const at::Tensor& col_lse, double shift_range) {
  check_block(S, "logits");
  const int64_t M = S.size(0), N = S.size(1);
  check_vector(row_lse, M, "row_lse");
  check_vector(col_lse, N, "col_lse");
  if (M == 0 || N == 0) return;
  const Shift sh = shift_of(row_lse, col_lse, shift_range);
  float* s = S.data_ptr<float>();
  if (sh.shared)
    ops().grad_shared(s, M, N, sh.top, sh.u.data(), sh.v.data());
  else
    ops().grad_wide(s, M, N, row_lse.data_ptr<float>(), col_lse.data_ptr<float>());
}

// In place: S <- exp(S - row_lse[:, None]), work <- exp(S - col_lse[None, :]).
void block_softmaxes(at::Tensor S, at::Tensor work, const at::Tensor& row_lse, const at::Tensor& col_lse,
                     double shift_range) {
  check_block(S, "logits");
  check_block(work, "work");
  const int64_t M = S.size(0), N = S.size(1);
  TORCH_CHECK(work.sizes() == S.sizes(), "work must have the shape of logits");
  check_vector(row_lse, M, "row_lse");
  check_vector(col_lse, N, "col_lse");
  if (M == 0 || N == 0) return;
  const Shift sh = shift_of(row_lse, col_lse, shift_range);
  float* s = S.data_ptr<float>();
  float* w = work.data_ptr<float>();
  if (sh.shared)
    ops().softmax_shared(s, w, M, N, sh.top, sh.u.data(), sh.v.data());
  else
    ops().softmax_wide(s, w, M, N, row_lse.data_ptr<float>(), col_lse.data_ptr<float>());
}

// The vectorised exponential on its own, for tests.
at::Tensor exp_f32_op(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x must be a float32 CPU tensor");
  at::Tensor src = x.contiguous();
  at::Tensor neg = -src;  // exact, and 0 - (-x) = x exactly
  at::Tensor y = at::empty_like(src);
  ops().offsets(neg.data_ptr<float>(), neg.numel(), 0.0f, y.data_ptr<float>());
  return y;
}

}  // namespace
}  // namespace contrastive_cpu
}  // namespace clip_fast

TORCH_LIBRARY_FRAGMENT(clip_fast, m) {
  m.def("contrastive_block_lse(Tensor logits, float shift_range) -> (Tensor, Tensor, bool)",
        &clip_fast::contrastive_cpu::block_lse);
  m.def("contrastive_block_grad(Tensor(a!) logits, Tensor row_lse, Tensor col_lse, float shift_range) -> ()",
        &clip_fast::contrastive_cpu::block_grad);
  m.def(
      "contrastive_block_softmaxes(Tensor(a!) logits, Tensor(b!) work, Tensor row_lse, Tensor col_lse, "
      "float shift_range) -> ()",
      &clip_fast::contrastive_cpu::block_softmaxes);
  m.def("contrastive_exp(Tensor x) -> Tensor", &clip_fast::contrastive_cpu::exp_f32_op);
}
