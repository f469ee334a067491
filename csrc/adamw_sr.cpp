// CPU implementation (OpenMP, vectorisable loops) of AdamW with stochastically rounded
// weights and half-precision moments, and of the stochastic-rounding cast on its own.
// The per-element arithmetic lives in adamw_sr.h and is shared with adamw_sr_cuda.cu.
//
// Work split: every tensor of a call is cut into chunks of kChunk elements; the chunks of
// all tensors form one list that OpenMP threads share, so a parameter group is one call
// whatever the sizes of its tensors. Inside a chunk, blocks of kBlock elements are done
// in two vectorisable passes: Philox fills kBlock (a, b) random words, then the update
// loop reads params/grads/moments once and writes params/moments once (6 bytes read and
// 6 written per element for bf16 weights, bf16 grads and bf16 moments).
//
// Instruction sets: the hot loops are compiled for AVX-512, AVX2 and baseline x86-64
// (GCC target attributes) and picked at run time, so one binary is fast everywhere and
// gives identical results everywhere (no FMA contraction: -ffp-contract=off).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "adamw_sr.h"
#include "cpu_isa.h"

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
template <int PK, int GK, int SK, bool SR>
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
    else if (SR) philox_words(a.key, base, n, wa, wb);
    for (int64_t i = 0; i < n; ++i) {
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

CF_HD void sr_range(const float* x, uint16_t* y, const int32_t* rand, uint64_t key, int64_t begin, int64_t end) {
  alignas(64) uint32_t wa[kBlock];
  alignas(64) uint32_t wb[kBlock];
  for (int64_t base = begin; base < end; base += kBlock) {
    const int64_t n = std::min(kBlock, end - base);
    if (rand != nullptr)
      for (int64_t i = 0; i < n; ++i) wa[i] = (uint32_t)rand[base + i];
    else
      philox_words(key, base, n, wa, wb);
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
#define CF_ISA_VARIANTS(ISA_NAME, TARGET)                                                                      \
  template <int PK, int GK, int SK, bool SR>                                                                 \
  TARGET void update_##ISA_NAME(const std::vector<TensorArgs>& args, const std::vector<Chunk>& chunks,      \
                                const Hyper& h, int64_t* counts, float* maxima) {                            \
    _Pragma("omp parallel for schedule(dynamic, 4) if (chunks.size() > 1)")                                                    \
    for (int64_t c = 0; c < (int64_t)chunks.size(); ++c) {                                                   \
      float amax = 0.0f;                                                                                     \
      counts[c] = update_range<PK, GK, SK, SR>(args[chunks[c].tensor], h, chunks[c].begin, chunks[c].end,   \
                                               amax);                                                        \
      maxima[c] = amax;                                                                                      \
    }                                                                                                        \
  }                                                                                                          \
  TARGET void sr_##ISA_NAME(const float* x, uint16_t* y, const int32_t* rand, uint64_t key, int64_t numel) { \
    _Pragma("omp parallel for schedule(static) if (numel > kChunk)")                                                     \
    for (int64_t b = 0; b < numel; b += kChunk) sr_range(x, y, rand, key, b, std::min(numel, b + kChunk));  \
  }

#if defined(__x86_64__) && defined(__GNUC__)
CF_ISA_VARIANTS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi2"))))
CF_ISA_VARIANTS(avx2, __attribute__((target("avx2,bmi2"))))
#endif
CF_ISA_VARIANTS(base, )

using Isa = CpuIsa;

// Chosen at the first call, not at load: a bad CLIP_FAST_CPU_ISA then raises a Python
// error there instead of aborting the import.
Isa active_isa() {
  static const Isa isa = detect_cpu_isa();
  return isa;
}

template <int PK, int GK, int SK, bool SR>
UpdateFn pick_update() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (active_isa() == Isa::kAvx512) return &update_avx512<PK, GK, SK, SR>;
  if (active_isa() == Isa::kAvx2) return &update_avx2<PK, GK, SK, SR>;
#endif
  return &update_base<PK, GK, SK, SR>;
}

SrFn pick_sr() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (active_isa() == Isa::kAvx512) return &sr_avx512;
  if (active_isa() == Isa::kAvx2) return &sr_avx2;
#endif
  return &sr_base;
}

template <int PK, int GK, int SK>
UpdateFn pick_sr_flag(bool sr) {
  return sr ? pick_update<PK, GK, SK, true>() : pick_update<PK, GK, SK, false>();
}

template <int PK, int GK>
UpdateFn pick_state(int sk, bool sr) {
  switch (sk) {
    case kF32: return pick_sr_flag<PK, GK, kF32>(sr);
    case kBF16: return pick_sr_flag<PK, GK, kBF16>(sr);
    default: return pick_sr_flag<PK, GK, kF16>(sr);
  }
}

// Supported (parameter, gradient) storage pairs: gradients in the parameter's dtype or fp32.
UpdateFn pick_kernel(int pk, int gk, int sk, bool sr) {
  if (pk == kF32 && gk == kF32) return pick_state<kF32, kF32>(sk, sr);
  if (pk == kBF16 && gk == kBF16) return pick_state<kBF16, kBF16>(sk, sr);
  if (pk == kBF16 && gk == kF32) return pick_state<kBF16, kF32>(sk, sr);
  if (pk == kF16 && gk == kF16) return pick_state<kF16, kF16>(sk, sr);
  if (pk == kF16 && gk == kF32) return pick_state<kF16, kF32>(sk, sr);
  return nullptr;
}

int kind_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

void check_cpu_contiguous(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

}  // namespace

// One AdamW step over all tensors of a parameter group (same dtypes throughout).
// Scalars arrive rounded to fp32 by the caller. Returns, per tensor, the number of
// elements skipped for a non-finite gradient and the max of the new sqrt(v) (0 unless the
// moments are fp16).
std::tuple<std::vector<int64_t>, std::vector<double>> adamw_step(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_rms,
    const std::vector<at::Tensor>& rand, const std::vector<int64_t>& keys, const std::vector<double>& step_sizes,
    const std::vector<double>& inv_sqrt_bc2, const std::vector<double>& decode_scales,
    const std::vector<double>& encode_scales, double beta1, double one_minus_beta1, double beta2,
    double one_minus_beta2, double decay, double eps, bool stochastic) {
  const size_t T = params.size();
  TORCH_CHECK(grads.size() == T && exp_avgs.size() == T && exp_avg_rms.size() == T && keys.size() == T &&
                  step_sizes.size() == T && inv_sqrt_bc2.size() == T && decode_scales.size() == T &&
                  encode_scales.size() == T,
              "adamw_step: all per-tensor lists must have the same length");
  TORCH_CHECK(rand.empty() || rand.size() == T, "adamw_step: rand must be empty or one tensor per parameter");
  if (T == 0) return {{}, {}};
  const int pk = kind_of(params[0], "params"), gk = kind_of(grads[0], "grads"), sk = kind_of(exp_avgs[0], "exp_avgs");
  UpdateFn fn = pick_kernel(pk, gk, sk, stochastic);
  TORCH_CHECK(fn != nullptr, "adamw_step: unsupported (param, grad) dtypes ", params[0].scalar_type(), ", ",
              grads[0].scalar_type());
  std::vector<TensorArgs> args(T);
  std::vector<int64_t> numels(T);
  for (size_t t = 0; t < T; ++t) {
    const at::Tensor *ts[4] = {&params[t], &grads[t], &exp_avgs[t], &exp_avg_rms[t]};
    const int kinds[4] = {pk, gk, sk, sk};
    for (int j = 0; j < 4; ++j) {
      check_cpu_contiguous(*ts[j], "adamw_step tensors");
      TORCH_CHECK(kind_of(*ts[j], "adamw_step tensors") == kinds[j], "adamw_step: mixed dtypes in one call");
      TORCH_CHECK(ts[j]->numel() == params[t].numel(), "adamw_step: size mismatch at tensor ", t);
    }
    const int32_t* rp = nullptr;
    if (!rand.empty()) {
      check_cpu_contiguous(rand[t], "rand");
      TORCH_CHECK(rand[t].scalar_type() == at::kInt && rand[t].numel() == 2 * params[t].numel(),
                  "rand[", t, "] must be int32 with 2 words per element");
      rp = rand[t].data_ptr<int32_t>();
    }
    numels[t] = params[t].numel();
    args[t] = TensorArgs{params[t].data_ptr(), grads[t].data_ptr(), exp_avgs[t].data_ptr(), exp_avg_rms[t].data_ptr(),
                         rp, (uint64_t)keys[t],
                         TensorScalars{(float)step_sizes[t], (float)inv_sqrt_bc2[t], (float)decode_scales[t],
                                       (float)encode_scales[t]}};
  }
  const Hyper h{(float)beta1, (float)one_minus_beta1, (float)beta2, (float)one_minus_beta2, (float)decay, (float)eps};
  const std::vector<Chunk> chunks = make_chunks(numels);
  std::vector<int64_t> chunk_counts(chunks.size());
  std::vector<float> chunk_max(chunks.size());
  fn(args, chunks, h, chunk_counts.data(), chunk_max.data());
  std::vector<int64_t> counts(T, 0);
  std::vector<double> maxima(T, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    counts[chunks[c].tensor] += chunk_counts[c];
    maxima[chunks[c].tensor] = std::max(maxima[chunks[c].tensor], (double)chunk_max[c]);
  }
  return {counts, maxima};
}

// fp32 -> bf16 with stochastic rounding; rand (optional): int32 per element, low 16 bits used.
at::Tensor stochastic_round_bf16(const at::Tensor& x, int64_t key, const c10::optional<at::Tensor>& rand) {
  check_cpu_contiguous(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32");
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const int32_t* rp = nullptr;
  if (rand.has_value()) {
    check_cpu_contiguous(*rand, "rand");
    TORCH_CHECK(rand->scalar_type() == at::kInt && rand->numel() == x.numel(), "rand must be int32 shaped like x");
    rp = rand->data_ptr<int32_t>();
  }
  pick_sr()(x.data_ptr<float>(), reinterpret_cast<uint16_t*>(y.data_ptr()), rp, (uint64_t)key, x.numel());
  return y;
}

// The random words (a, b) of elements [0, numel) for a key: int32 (numel, 2).
at::Tensor random_words(int64_t key, int64_t numel) {
  at::Tensor out = at::empty({numel, 2}, at::TensorOptions().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  alignas(64) uint32_t wa[kBlock];
  alignas(64) uint32_t wb[kBlock];
  for (int64_t base = 0; base < numel; base += kBlock) {
    const int64_t n = std::min(kBlock, numel - base);
    philox_words((uint64_t)key, base, n, wa, wb);
    for (int64_t i = 0; i < n; ++i) {
      o[2 * (base + i)] = (int32_t)wa[i];
      o[2 * (base + i) + 1] = (int32_t)wb[i];
    }
  }
  return out;
}

std::string cpu_isa() {
  switch (active_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace clip_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "clip_fast CPU kernels: AdamW with stochastic rounding";
  m.def("adamw_step", &clip_fast::adamw_step, "One AdamW step over a parameter group (see clip_fast/optim.py)");
  m.def("stochastic_round_bf16", &clip_fast::stochastic_round_bf16, "fp32 -> bf16 with stochastic rounding",
        pybind11::arg("x"), pybind11::arg("key"), pybind11::arg("rand") = pybind11::none());
  m.def("random_words", &clip_fast::random_words, "Philox words (a, b) per element for a key");
  m.def("cpu_isa", &clip_fast::cpu_isa, "instruction set the kernels were dispatched to");
}
