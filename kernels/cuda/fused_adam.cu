#include "cuda/fused_adam.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace zeal::kernels {
namespace {

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
template <>
__device__ __forceinline__ float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }

template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, float v);
template <>
__device__ __forceinline__ void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ void store<__half>(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

template <typename T>
__global__ void fused_adam_kernel(FusedAdamBatch batch, FusedAdamHyper h) {
  const int t = batch.tensor_of[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(batch.chunk_of[blockIdx.x]) * kFusedChunk;
  const int64_t end = min(batch.numel[t], begin + kFusedChunk);
  T* p = static_cast<T*>(batch.params[t]);
  const T* g = static_cast<const T*>(batch.grads[t]);
  float* m = batch.exp_avg[t];
  float* v = batch.exp_avg_sq[t];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float grad = load(g, i);
    float param = load(p, i);
    if (h.decoupled) {
      param *= h.decay;
    } else {
      grad += h.weight_decay * param;
    }
    const float mi = m[i] + h.lerp_weight * (grad - m[i]);
    const float vi = v[i] * h.beta2 + h.one_minus_beta2 * grad * grad;
    const float denom = sqrtf(vi) / h.bc2_sqrt + h.eps;
    param += h.neg_step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
    store(p, i, param);
  }
}

}  // namespace

cudaError_t fused_adam_launch(const FusedAdamBatch& batch, ParamDtype dtype, const FusedAdamHyper& hyper,
                              cudaStream_t stream) {
  if (batch.num_blocks <= 0) return cudaSuccess;
  if (batch.num_blocks > kFusedMaxBlocks) return cudaErrorInvalidValue;
  constexpr int kThreads = 512;
  switch (dtype) {
    case ParamDtype::kFp32:
      fused_adam_kernel<float><<<batch.num_blocks, kThreads, 0, stream>>>(batch, hyper);
      break;
    case ParamDtype::kBf16:
      fused_adam_kernel<__nv_bfloat16><<<batch.num_blocks, kThreads, 0, stream>>>(batch, hyper);
      break;
    case ParamDtype::kFp16:
      fused_adam_kernel<__half><<<batch.num_blocks, kThreads, 0, stream>>>(batch, hyper);
      break;
  }
  return cudaGetLastError();
}

}  // namespace zeal::kernels
