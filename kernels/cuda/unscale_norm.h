// The mixed-precision path before the optimizer, on the GPU: grads *= inv_scale (not written when
// inv_scale is 1) and the sum of squares of the result, in one pass over the gradients. The sum is
// inf or NaN when any gradient is, which is the fp16 overflow check.
// Deterministic: each block writes its partial sum to block_sums[blockIdx.x] and one more block
// adds them in index order into *sum_sq (double), so the result does not depend on scheduling.
// A leaf: pointers, sizes and a stream, no torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace zeal::kernels {

constexpr int kUnscaleNormMaxBlocks = 1024;

// Host contract: grads holds count fp32 elements of device memory; block_sums has room for
// kUnscaleNormMaxBlocks floats and sum_sq for one double, both device memory.
cudaError_t unscale_and_norm(float* grads, int64_t count, float inv_scale, float* block_sums, double* sum_sq,
                             cudaStream_t stream);

}  // namespace zeal::kernels
