#include "cuda/fused_lamb.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace zeal::kernels {
namespace {

constexpr int kThreads = 512;

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float lamb_update(const FusedLambHyper& h, float m, float v, float p) {
  return (m * h.inv_bc1) / (sqrtf(v * h.inv_bc2) + h.eps) + h.weight_decay * p;
}

// Sum over a block (valid in thread 0).
__device__ float block_sum(float value, float* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.0f;
  if (warp == 0)
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

template <typename T>
__global__ void lamb_phase1_kernel(FusedLambBatch batch, FusedLambHyper h, double* norm_sums) {
  __shared__ float shared[kThreads / 32];
  const int t = batch.tensor_of[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(batch.chunk_of[blockIdx.x]) * kFusedChunk;
  const int64_t end = min(batch.numel[t], begin + kFusedChunk);
  const T* p = static_cast<const T*>(batch.params[t]);
  const T* g = static_cast<const T*>(batch.grads[t]);
  float* m = batch.exp_avg[t];
  float* v = batch.exp_avg_sq[t];
  float psq = 0.0f, usq = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float grad = to_float(g[i]), param = to_float(p[i]);
    const float mi = h.beta1 * m[i] + h.one_minus_beta1 * grad;
    const float vi = h.beta2 * v[i] + h.one_minus_beta2 * grad * grad;
    m[i] = mi;
    v[i] = vi;
    const float u = lamb_update(h, mi, vi, param);
    psq += param * param;
    usq += u * u;
  }
  psq = block_sum(psq, shared);
  usq = block_sum(usq, shared);
  if (threadIdx.x == 0) {
    const int slot = batch.slot_of[t];
    atomicAdd(&norm_sums[2 * slot], static_cast<double>(psq));
    atomicAdd(&norm_sums[2 * slot + 1], static_cast<double>(usq));
  }
}

template <typename T>
__global__ void lamb_phase2_kernel(FusedLambBatch batch, FusedLambHyper h, const double* norm_sums) {
  const int t = batch.tensor_of[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(batch.chunk_of[blockIdx.x]) * kFusedChunk;
  const int64_t end = min(batch.numel[t], begin + kFusedChunk);
  const int slot = batch.slot_of[t];
  const double p_norm = sqrt(norm_sums[2 * slot]), u_norm = sqrt(norm_sums[2 * slot + 1]);
  double ratio = (p_norm > 0.0 && u_norm > 0.0) ? p_norm / u_norm : 1.0;
  ratio = fmin(h.max_coeff, fmax(h.min_coeff, ratio));
  const float step = static_cast<float>(-static_cast<double>(h.lr) * ratio);
  T* p = static_cast<T*>(batch.params[t]);
  const float* m = batch.exp_avg[t];
  const float* v = batch.exp_avg_sq[t];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float param = to_float(p[i]);
    p[i] = from_float<T>(param + step * lamb_update(h, m[i], v[i], param));
  }
}

template <template <typename> class Launch, typename... Args>
cudaError_t dispatch(ParamDtype dtype, Args... args) {
  switch (dtype) {
    case ParamDtype::kFp32: Launch<float>::run(args...); break;
    case ParamDtype::kBf16: Launch<__nv_bfloat16>::run(args...); break;
    case ParamDtype::kFp16: Launch<__half>::run(args...); break;
  }
  return cudaGetLastError();
}

template <typename T>
struct Phase1 {
  static void run(const FusedLambBatch& b, const FusedLambHyper& h, double* sums, cudaStream_t s) {
    lamb_phase1_kernel<T><<<b.num_blocks, kThreads, 0, s>>>(b, h, sums);
  }
};
template <typename T>
struct Phase2 {
  static void run(const FusedLambBatch& b, const FusedLambHyper& h, const double* sums, cudaStream_t s) {
    lamb_phase2_kernel<T><<<b.num_blocks, kThreads, 0, s>>>(b, h, sums);
  }
};

}  // namespace

cudaError_t fused_lamb_phase1_launch(const FusedLambBatch& batch, ParamDtype dtype, const FusedLambHyper& hyper,
                                     double* norm_sums, cudaStream_t stream) {
  if (batch.num_blocks <= 0) return cudaSuccess;
  if (batch.num_blocks > kFusedMaxBlocks) return cudaErrorInvalidValue;
  return dispatch<Phase1>(dtype, batch, hyper, norm_sums, stream);
}

cudaError_t fused_lamb_phase2_launch(const FusedLambBatch& batch, ParamDtype dtype, const FusedLambHyper& hyper,
                                     const double* norm_sums, cudaStream_t stream) {
  if (batch.num_blocks <= 0) return cudaSuccess;
  if (batch.num_blocks > kFusedMaxBlocks) return cudaErrorInvalidValue;
  return dispatch<Phase2>(dtype, batch, hyper, norm_sums, stream);
}

}  // namespace zeal::kernels
