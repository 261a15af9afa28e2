// 1-bit compression with error feedback on the GPU: the CUDA side of kernels/cpu/onebit.h, with
// the same bit layout (element 8b + k in bit k of byte b) and the same rounding order, so CPU and
// GPU ranks agree. The scale's sum of squares is left to the caller (a reduction it already has).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace zeal::kernels {

// bits[b] <- signs of c = x + error for elements 8b..8b+7; error <- c - scale * sign(c) below
// n_valid, 0 from there. n_total is a multiple of 8.
cudaError_t onebit_pack_cuda(const float* x, float* error, float scale, uint8_t* bits, int64_t n_valid,
                             int64_t n_total, cudaStream_t stream);

// out[i] = scale * (bit i ? 1 : -1), or out[i] += that with accumulate, for i < n.
cudaError_t onebit_unpack_cuda(const uint8_t* bits, float scale, float* out, int64_t n, bool accumulate,
                               cudaStream_t stream);

}  // namespace zeal::kernels
