#include "cuda/onebit.h"

namespace zeal::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void pack_kernel(const float* __restrict__ x, float* __restrict__ error, float scale,
                            uint8_t* __restrict__ bits, int64_t n_valid, int64_t n_bytes) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < n_bytes;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    unsigned byte = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int64_t i = 8 * b + k;
      if (i >= n_valid) {
        error[i] = 0.0f;
        continue;
      }
      const float c = __fadd_rn(x[i], error[i]);
      const bool positive = c >= 0.0f;
      byte |= positive ? (1u << k) : 0u;
      error[i] = __fsub_rn(c, positive ? scale : -scale);
    }
    bits[b] = static_cast<uint8_t>(byte);
  }
}

__global__ void unpack_kernel(const uint8_t* __restrict__ bits, float scale, float* __restrict__ out, int64_t n,
                              bool accumulate) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = ((bits[i >> 3] >> (i & 7)) & 1u) ? scale : -scale;
    out[i] = accumulate ? __fadd_rn(out[i], v) : v;
  }
}

int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

}  // namespace

cudaError_t onebit_pack_cuda(const float* x, float* error, float scale, uint8_t* bits, int64_t n_valid,
                             int64_t n_total, cudaStream_t stream) {
  if (n_total <= 0) return cudaSuccess;
  pack_kernel<<<blocks_for(n_total / 8), kThreads, 0, stream>>>(x, error, scale, bits, n_valid, n_total / 8);
  return cudaGetLastError();
}

cudaError_t onebit_unpack_cuda(const uint8_t* bits, float scale, float* out, int64_t n, bool accumulate,
                               cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  unpack_kernel<<<blocks_for(n), kThreads, 0, stream>>>(bits, scale, out, n, accumulate);
  return cudaGetLastError();
}

}  // namespace zeal::kernels
