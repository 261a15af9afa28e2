#include "cuda/unscale_norm.h"

namespace zeal::kernels {
namespace {

constexpr int kThreads = 512;

// Sum over a block: warp shuffles, then one value per warp through shared memory.
__device__ float block_sum(float value) {
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (warp == 0)
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;  // valid in thread 0
}

template <bool kScale>
__global__ void unscale_norm_kernel(float* grads, int64_t count, float inv_scale, float* block_sums) {
  float acc = 0.0f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count; i += stride) {
    float g = grads[i];
    if (kScale) {
      g *= inv_scale;
      grads[i] = g;
    }
    acc += g * g;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = acc;
}

__global__ void add_block_sums_kernel(const float* block_sums, int blocks, double* sum_sq) {
  if (threadIdx.x != 0) return;
  double total = 0.0;
  for (int b = 0; b < blocks; ++b) total += block_sums[b];
  *sum_sq = total;
}

}  // namespace

cudaError_t unscale_and_norm(float* grads, int64_t count, float inv_scale, float* block_sums, double* sum_sq,
                             cudaStream_t stream) {
  int64_t blocks = (count + kThreads - 1) / kThreads;
  if (blocks > kUnscaleNormMaxBlocks) blocks = kUnscaleNormMaxBlocks;
  if (blocks < 1) blocks = 1;
  const unsigned grid = static_cast<unsigned>(blocks);
  if (inv_scale == 1.0f)
    unscale_norm_kernel<false><<<grid, kThreads, 0, stream>>>(grads, count, inv_scale, block_sums);
  else
    unscale_norm_kernel<true><<<grid, kThreads, 0, stream>>>(grads, count, inv_scale, block_sums);
  add_block_sums_kernel<<<1, 32, 0, stream>>>(block_sums, static_cast<int>(blocks), sum_sq);
  return cudaGetLastError();
}

}  // namespace zeal::kernels
