// CUDA version of the AdamW-with-stochastic-rounding kernel (same algorithm, same random
// stream and same tables as the Triton kernel in kernels/adamw.py; per-element code shared
// with the CPU kernel through adamw_sr.h).
//
// The production GPU path is the Triton kernel; this one is for users who link CUDA code
// without Triton. It needs no torch headers: C-callable launchers take device pointers and
// a stream, and the tables (META_COLS int64 columns per tensor, an int32 block table)
// are the ones kernels/adamw.py builds. Compile with --fmad=false so results match the
// other paths bit for bit:
//   nvcc -O3 --fmad=false -arch=sm_90 -Xcompiler -fPIC -shared adamw_sr_cuda.cu -o libadamw_sr_cuda.so
#include <cuda_runtime.h>

#include "adamw_sr.h"

namespace clip_fast {
namespace {

constexpr int kBlockElems = 1024;             // elements per CUDA block (= kernels/adamw.py BLOCK)
constexpr int kThreads = kBlockElems / 2;     // one Philox call, two elements per thread
constexpr int kMetaCols = 9;                  // p, g, m, r, rand, numel, key, step_size, inv_sqrt_bc2

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

template <int PK, int GK, int SK, bool SR>
__global__ void __launch_bounds__(kThreads)
    adamw_sr_kernel(const int64_t* __restrict__ meta, const int32_t* __restrict__ blocks,
                    const int32_t* __restrict__ exp_in, const float* __restrict__ amax_in, int32_t* exp_out,
                    float* amax_out, int32_t* counts, Hyper h, bool explicit_bits) {
  using PT = typename Storage<PK>::T;
  using GT = typename Storage<GK>::T;
  using ST = typename Storage<SK>::T;
  const int64_t t = blocks[2 * blockIdx.x];
  const int64_t blk = blocks[2 * blockIdx.x + 1];
  const int64_t* row = meta + t * kMetaCols;
  PT* p = reinterpret_cast<PT*>(row[0]);
  const GT* g = reinterpret_cast<const GT*>(row[1]);
  ST* m = reinterpret_cast<ST*>(row[2]);
  ST* r = reinterpret_cast<ST*>(row[3]);
  const int32_t* rand = reinterpret_cast<const int32_t*>(row[4]);
  const int64_t numel = row[5];
  TensorScalars s{__int_as_float((int32_t)row[7]), __int_as_float((int32_t)row[8]), 1.0f, 1.0f};
  if constexpr (SK == kF16) {
    const int e_old = exp_in[t];
    const int e_new = next_moment_exp(e_old, amax_in[t]);
    s.decode_scale = exp2_int(-e_old);
    s.encode_scale = exp2_int(e_new);
    if (threadIdx.x == 0) exp_out[t] = e_new;
  }
  const int64_t pair = blk * kThreads + threadIdx.x;  // Philox counter: elements 2*pair, 2*pair+1
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  if (SR) {
    if (explicit_bits) {
      for (int j = 0; j < 2; ++j)
        if (2 * pair + j < numel) {
          w[2 * j] = (uint32_t)rand[2 * (2 * pair + j)];
          w[2 * j + 1] = (uint32_t)rand[2 * (2 * pair + j) + 1];
        }
    } else {
      philox4x32_10((uint64_t)pair, (uint64_t)row[6], w[0], w[1], w[2], w[3]);
    }
  }
  constexpr bool kPStochastic = SR && PK == kBF16;
  int skipped = 0;
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int64_t e = 2 * pair + j;
    if (e >= numel) break;
    float pi = load_as_f32<PK>(p[e]);
    float mi = load_as_f32<SK>(m[e]);
    float ri = load_as_f32<SK>(r[e]);
    if constexpr (SK == kF16) {
      mi *= s.decode_scale;
      ri *= s.decode_scale;
    }
    skipped += adamw_element(pi, load_as_f32<GK>(g[e]), mi, ri, h, s) ? 0 : 1;
    if constexpr (SK == kF16) {
      amax = fmaxf(amax, ri);
      mi *= s.encode_scale;
      ri *= s.encode_scale;
    }
    p[e] = round_to<PK>(pi, w[2 * j] & 0xFFFFu, kPStochastic);
    m[e] = round_to<SK>(mi, w[2 * j] >> 16, SR);
    r[e] = round_to<SK>(ri, w[2 * j + 1] & 0xFFFFu, SR);
  }
  skipped = warp_sum(skipped);
  if ((threadIdx.x & 31) == 0 && skipped > 0) atomicAdd(counts + t, skipped);
  if constexpr (SK == kF16) {
    amax = warp_max(amax);
    // amax >= 0: the int order of the bit patterns is the float order.
    if ((threadIdx.x & 31) == 0) atomicMax(reinterpret_cast<int*>(amax_out + t), __float_as_int(amax));
  }
}

__global__ void __launch_bounds__(kThreads)
    stochastic_round_kernel(const float* __restrict__ x, uint16_t* __restrict__ y,
                            const int32_t* __restrict__ rand, uint64_t key, int64_t numel) {
  const int64_t pair = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  uint32_t w[4];
  if (rand == nullptr) philox4x32_10((uint64_t)pair, key, w[0], w[1], w[2], w[3]);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int64_t e = 2 * pair + j;
    if (e >= numel) break;
    const uint32_t bits = rand != nullptr ? (uint32_t)rand[e] : w[2 * j];
    y[e] = sr_bf16(x[e], bits & 0xFFFFu);
  }
}

template <int PK, int GK, int SK, bool SR>
cudaError_t launch(const int64_t* meta, const int32_t* blocks, int64_t n_blocks, const int32_t* exp_in,
                   const float* amax_in, int32_t* exp_out, float* amax_out, int32_t* counts, const Hyper& h,
                   bool explicit_bits, cudaStream_t stream) {
  adamw_sr_kernel<PK, GK, SK, SR><<<(unsigned)n_blocks, kThreads, 0, stream>>>(meta, blocks, exp_in, amax_in, exp_out,
                                                                               amax_out, counts, h, explicit_bits);
  return cudaGetLastError();
}

template <int PK, int GK, int SK>
cudaError_t launch_sr(bool sr, const int64_t* meta, const int32_t* blocks, int64_t n_blocks, const int32_t* exp_in,
                      const float* amax_in, int32_t* exp_out, float* amax_out, int32_t* counts, const Hyper& h,
                      bool explicit_bits, cudaStream_t stream) {
  return sr ? launch<PK, GK, SK, true>(meta, blocks, n_blocks, exp_in, amax_in, exp_out, amax_out, counts, h,
                                       explicit_bits, stream)
            : launch<PK, GK, SK, false>(meta, blocks, n_blocks, exp_in, amax_in, exp_out, amax_out, counts, h,
                                        explicit_bits, stream);
}

}  // namespace
}  // namespace clip_fast

// Supported (param, grad, moment) kinds (0 fp32, 1 bf16, 2 fp16): (1,1,1) (1,1,2) (1,1,0)
// (0,0,0) (2,2,2), each with and without SR; others return cudaErrorInvalidValue.
extern "C" int clip_fast_adamw_sr_cuda(const int64_t* meta, const int32_t* blocks, int64_t n_blocks,
                                       const int32_t* exp_in, const float* amax_in, int32_t* exp_out,
                                       float* amax_out, int32_t* counts, float beta1, float one_minus_beta1,
                                       float beta2, float one_minus_beta2, float decay, float eps, int p_kind,
                                       int g_kind, int s_kind, int stochastic, int explicit_bits,
                                       cudaStream_t stream) {
  using namespace clip_fast;
  if (n_blocks == 0) return cudaSuccess;
  const Hyper h{beta1, one_minus_beta1, beta2, one_minus_beta2, decay, eps};
  const bool sr = stochastic != 0, ex = explicit_bits != 0;
#define CF_ARGS sr, meta, blocks, n_blocks, exp_in, amax_in, exp_out, amax_out, counts, h, ex, stream
  if (p_kind == kBF16 && g_kind == kBF16 && s_kind == kBF16) return launch_sr<kBF16, kBF16, kBF16>(CF_ARGS);
  if (p_kind == kBF16 && g_kind == kBF16 && s_kind == kF16) return launch_sr<kBF16, kBF16, kF16>(CF_ARGS);
  if (p_kind == kBF16 && g_kind == kBF16 && s_kind == kF32) return launch_sr<kBF16, kBF16, kF32>(CF_ARGS);
  if (p_kind == kF32 && g_kind == kF32 && s_kind == kF32) return launch_sr<kF32, kF32, kF32>(CF_ARGS);
  if (p_kind == kF16 && g_kind == kF16 && s_kind == kF16) return launch_sr<kF16, kF16, kF16>(CF_ARGS);
#undef CF_ARGS
  return cudaErrorInvalidValue;
}

// fp32 -> bf16 (as uint16) with stochastic rounding; rand: int32 per element or nullptr (Philox).
extern "C" int clip_fast_stochastic_round_bf16_cuda(const float* x, uint16_t* y, const int32_t* rand, int64_t key,
                                                    int64_t numel, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int64_t pairs = (numel + 1) / 2;
  const unsigned grid = (unsigned)((pairs + clip_fast::kThreads - 1) / clip_fast::kThreads);
  clip_fast::stochastic_round_kernel<<<grid, clip_fast::kThreads, 0, stream>>>(x, y, rand, (uint64_t)key, numel);
  return cudaGetLastError();
}
