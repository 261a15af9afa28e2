// Block-wise symmetric quantization on the GPU: the CUDA side of kernels/cpu/quantize.h, with the
// same layout and the same rounding (every operation rounded as written), so CPU and GPU ranks send
// and receive the same bytes. One CUDA block per quantization block.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace zeal::kernels {

cudaError_t quantize_blocks_cuda(const float* x, float* error, int64_t n, int64_t block, int bits, uint8_t* q,
                                 float* scales, cudaStream_t stream, float error_beta = 0.0f);

cudaError_t dequantize_blocks_cuda(const uint8_t* q, const float* scales, int64_t n, int64_t block, int bits,
                                   float* out, bool accumulate, cudaStream_t stream);

}  // namespace zeal::kernels
