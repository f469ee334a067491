// CPU implementation of AdamW with stochastically rounded weights and half-precision
// moments, and of the stochastic-rounding cast: the torch bindings and the run-time choice
// of instruction set. The loops are in adamw_sr_cpu.h, the per-element arithmetic in
// adamw_sr.h.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "adamw_sr.h"
#include "adamw_sr_cpu.h"
#include "cpu_isa.h"

namespace clip_fast {
namespace {

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
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_rms,
    at::TensorList rand, at::IntArrayRef keys, at::ArrayRef<double> step_sizes, at::ArrayRef<double> inv_sqrt_bc2,
    at::ArrayRef<double> decode_scales, at::ArrayRef<double> encode_scales, double beta1, double one_minus_beta1, double beta2,
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

// Registered as torch.ops.clip_fast.* (each C++ file adds its ops with a fragment; the
// Python module itself is csrc/python_module.cpp).
TORCH_LIBRARY_FRAGMENT(clip_fast, m) {
  m.def(
      "adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_rms, "
      "Tensor[] rand, int[] keys, float[] step_sizes, float[] inv_sqrt_bc2, float[] decode_scales, "
      "float[] encode_scales, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, "
      "float decay, float eps, bool stochastic) -> (int[], float[])",
      &clip_fast::adamw_step);
  m.def("stochastic_round_bf16(Tensor x, int key, Tensor? rand=None) -> Tensor", &clip_fast::stochastic_round_bf16);
  m.def("random_words(int key, int numel) -> Tensor", &clip_fast::random_words);
  m.def("cpu_isa() -> str", &clip_fast::cpu_isa);
}
