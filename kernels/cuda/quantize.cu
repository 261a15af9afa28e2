#include "cuda/quantize.h"

namespace zeal::kernels {
namespace {

constexpr int kThreads = 256;

__device__ float block_max(float v, float* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? shared[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

__device__ __forceinline__ float level(float c, float inv, float qmax) {
  return fminf(qmax, fmaxf(-qmax, rintf(__fmul_rn(c, inv))));
}

// The error carried on: the residual r, or with LoCo (beta > 0) (beta * old) + (keep * r), as the CPU
// kernel rounds it.
__device__ __forceinline__ float feedback(float old_error, float r, float beta, float keep) {
  return beta == 0.0f ? r : __fadd_rn(__fmul_rn(beta, old_error), __fmul_rn(keep, r));
}

__device__ __forceinline__ unsigned nibble(float v) { return static_cast<unsigned>(static_cast<int>(v)) & 0xFu; }

// Grid-stride over quantization blocks; the threads of a CUDA block share one quantization block.
__global__ void quantize_kernel(const float* __restrict__ x, float* __restrict__ error, int64_t n, int64_t block,
                                int bits, uint8_t* __restrict__ q, float* __restrict__ scales, int64_t blocks,
                                float beta) {
  __shared__ float shared[kThreads / 32];
  const float qmax = bits == 8 ? 127.0f : 7.0f;
  const float keep = __fsub_rn(1.0f, beta);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t start = b * block, len = min(block, n - start);
    float amax = 0.0f;
    int bad = 0;
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const float c = error ? __fadd_rn(x[start + i], error[start + i]) : x[start + i];
      amax = fmaxf(amax, fabsf(c));
      bad |= !isfinite(c);
    }
    bad = __syncthreads_or(bad);
    amax = block_max(amax, shared);
    const float scale = bad ? __int_as_float(0x7fc00000) : (amax > 0.0f ? __fdiv_rn(amax, qmax) : 0.0f);
    const float inv = bad || !(amax > 0.0f) ? 0.0f : __fdiv_rn(qmax, amax);
    if (threadIdx.x == 0) scales[b] = scale;
    if (bits == 8) {
      int8_t* out = reinterpret_cast<int8_t*>(q) + start;
      for (int64_t i = threadIdx.x; i < len; i += kThreads) {
        if (bad) {
          out[i] = 0;
          continue;
        }
        const float c = error ? __fadd_rn(x[start + i], error[start + i]) : x[start + i];
        const float v = level(c, inv, qmax);
        out[i] = static_cast<int8_t>(v);
        if (error) error[start + i] = feedback(error[start + i], __fsub_rn(c, __fmul_rn(v, scale)), beta, keep);
      }
    } else {
      uint8_t* out = q + start / 2;
      for (int64_t j = threadIdx.x; j < (len + 1) / 2; j += kThreads) {
        if (bad) {
          out[j] = 0;
          continue;
        }
        unsigned byte = 0;
        for (int k = 0; k < 2 && 2 * j + k < len; ++k) {
          const int64_t i = start + 2 * j + k;
          const float c = error ? __fadd_rn(x[i], error[i]) : x[i];
          const float v = level(c, inv, qmax);
          byte |= nibble(v) << (4 * k);
          if (error) error[i] = feedback(error[i], __fsub_rn(c, __fmul_rn(v, scale)), beta, keep);
        }
        out[j] = static_cast<uint8_t>(byte);
      }
    }
    __syncthreads();  // shared is reused by the next block's reduction
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scales, int64_t n,
                                  int64_t block, int bits, float* __restrict__ out, bool accumulate) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v;
    if (bits == 8) {
      v = static_cast<float>(reinterpret_cast<const int8_t*>(q)[i]);
    } else {
      const unsigned byte = q[i / 2];
      const unsigned nib = (i % 2 ? byte >> 4 : byte) & 0xFu;
      v = static_cast<float>(static_cast<int>(nib << 28) >> 28);
    }
    const float d = __fmul_rn(v, scales[i / block]);
    out[i] = accumulate ? __fadd_rn(out[i], d) : d;
  }
}

int grid_for(int64_t work) { return static_cast<int>(work < 1 ? 1 : (work > 65535 ? 65535 : work)); }

}  // namespace

cudaError_t quantize_blocks_cuda(const float* x, float* error, int64_t n, int64_t block, int bits, uint8_t* q,
                                 float* scales, cudaStream_t stream, float error_beta) {
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = (n + block - 1) / block;
  quantize_kernel<<<grid_for(blocks), kThreads, 0, stream>>>(x, error, n, block, bits, q, scales, blocks, error_beta);
  return cudaGetLastError();
}

cudaError_t dequantize_blocks_cuda(const uint8_t* q, const float* scales, int64_t n, int64_t block, int bits,
                                   float* out, bool accumulate, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  dequantize_kernel<<<grid_for((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(q, scales, n, block, bits,
                                                                                      out, accumulate);
  return cudaGetLastError();
}

}  // namespace zeal::kernels
