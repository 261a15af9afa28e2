// Multi-tensor fused LAMB on the GPU, in two launches per batch of tensors (the layout of
// fused_adam.h: block b works on chunk chunk_of[b] of tensor tensor_of[b]):
//   phase 1  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  u = m_hat / (sqrt(v_hat) + eps) + wd p;
//            each block adds its sums of p^2 and u^2 into norm_sums[2 slot], [2 slot + 1] (double
//            atomics) where slot = slot_of[tensor];
//   (the caller may add the sums of other ranks' pieces of the same tensors here: ZeRO)
//   phase 2  ratio = clamp(||p|| / ||u||, min_coeff, max_coeff) (1 when either norm is 0), computed
//            by every block from norm_sums; p -= lr * ratio * u, u recomputed from the moments.
// Parameters and gradients fp32, bf16 or fp16 (one dtype per launch), moments fp32.
// A leaf: pointers, sizes and a stream, no torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/fused_adam.h"

namespace zeal::kernels {

struct FusedLambHyper {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float inv_bc1, inv_bc2;  // 1 / bias corrections (1 without bias correction)
  float eps, weight_decay;
  float lr;
  double min_coeff, max_coeff;
};

struct FusedLambBatch {
  void* params[kFusedMaxTensors];
  const void* grads[kFusedMaxTensors];  // phase 1 only
  float* exp_avg[kFusedMaxTensors];
  float* exp_avg_sq[kFusedMaxTensors];
  int64_t numel[kFusedMaxTensors];
  int slot_of[kFusedMaxTensors];  // the tensor's pair of sums in norm_sums
  unsigned char tensor_of[kFusedMaxBlocks];
  int chunk_of[kFusedMaxBlocks];
  int num_blocks;
};

// Host contract: device pointers of numel elements; norm_sums device doubles, zeroed before the
// first phase-1 launch of a step, 2 per slot.
cudaError_t fused_lamb_phase1_launch(const FusedLambBatch& batch, ParamDtype dtype, const FusedLambHyper& hyper,
                                     double* norm_sums, cudaStream_t stream);
cudaError_t fused_lamb_phase2_launch(const FusedLambBatch& batch, ParamDtype dtype, const FusedLambHyper& hyper,
                                     const double* norm_sums, cudaStream_t stream);

}  // namespace zeal::kernels
