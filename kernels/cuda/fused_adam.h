// Multi-tensor fused Adam / AdamW on the GPU: one launch updates many tensors, each cut into
// chunks of kFusedChunk elements; block b works on chunk chunk_of[b] of tensor tensor_of[b].
// Parameters and gradients are fp32, bf16 or fp16 (same dtype); moments are fp32; the update is
// computed in fp32 in torch.optim.Adam(W)'s order and rounded once into the parameter.
// A leaf: pointers, sizes and a stream, no torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace zeal::kernels {

enum class ParamDtype { kFp32, kBf16, kFp16 };

constexpr int kFusedMaxTensors = 36;
constexpr int kFusedMaxBlocks = 320;
constexpr int64_t kFusedChunk = 65536;

struct FusedAdamHyper {
  float neg_step_size;   // -(lr / bias_correction1)
  float bc2_sqrt;        // sqrt(bias_correction2)
  float lerp_weight;     // 1 - beta1
  float beta2, one_minus_beta2;
  float eps, weight_decay;
  float decay;           // 1 - lr * weight_decay (decoupled)
  bool decoupled;
};

// One launch's worth of work: up to kFusedMaxTensors tensors and kFusedMaxBlocks chunks.
struct FusedAdamBatch {
  void* params[kFusedMaxTensors];
  const void* grads[kFusedMaxTensors];
  float* exp_avg[kFusedMaxTensors];
  float* exp_avg_sq[kFusedMaxTensors];
  int64_t numel[kFusedMaxTensors];
  unsigned char tensor_of[kFusedMaxBlocks];
  int chunk_of[kFusedMaxBlocks];
  int num_blocks;
};

// Host contract: every pointer is device memory of numel elements; batch.num_blocks <= kFusedMaxBlocks.
cudaError_t fused_adam_launch(const FusedAdamBatch& batch, ParamDtype dtype, const FusedAdamHyper& hyper,
                              cudaStream_t stream);

}  // namespace zeal::kernels
