// The torch-aware adapter of kernels/cuda/fused_adam.h: checks a list of device tensors, packs
// them into launches of up to kFusedMaxTensors tensors / kFusedMaxBlocks chunks, and runs them on
// the legacy default stream, after the caller's kernels there (torch's default stream).
// Available when Zeal is built with CUDA (zeal/features.h: ZEAL_WITH_CUDA).
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/optim/cpu_optim.h"

namespace zeal::optim {

// One Adam / AdamW step over many CUDA tensors: params and grads all fp32, all bf16 or all fp16
// (one dtype per call), moments fp32, every list the same length and each tensor contiguous.
void fused_adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq,
                     const AdamHyper& hyper);

}  // namespace zeal::optim
