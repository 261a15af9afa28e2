#include "cuda/unscale_check.h"

namespace zeal::kernels {
namespace {

__global__ void unscale_and_check_kernel(float* grads, size_t count, float inv_scale, int* found_nonfinite) {
  bool bad = false;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float g = grads[i];
    bad |= !isfinite(g);
    grads[i] = g * inv_scale;
  }
  // One write per warp that saw a non-finite value keeps the atomic traffic small.
  if (__any_sync(0xffffffffu, bad) && (threadIdx.x % 32) == 0) atomicExch(found_nonfinite, 1);
}

}  // namespace

cudaError_t unscale_and_check(float* grads, size_t count, float inv_scale, int* found_nonfinite,
                              cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  size_t blocks = (count + kThreads - 1) / kThreads;
  if (blocks > 4096) blocks = 4096;
  unscale_and_check_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(grads, count, inv_scale,
                                                                                   found_nonfinite);
  return cudaGetLastError();
}

}  // namespace zeal::kernels
