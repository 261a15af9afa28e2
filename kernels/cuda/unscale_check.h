// Multiply fp32 gradients by inv_scale in place and record whether any element was inf or NaN.
// The device half of mixed-precision unscaling; *found_nonfinite must be zeroed by the caller.
// A leaf: pointers, sizes and a stream, no torch headers.
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

namespace zeal::kernels {

cudaError_t unscale_and_check(float* grads, size_t count, float inv_scale, int* found_nonfinite,
                              cudaStream_t stream);

}  // namespace zeal::kernels
