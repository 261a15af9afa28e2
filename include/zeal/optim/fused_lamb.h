// The torch-aware adapter of kernels/cuda/fused_lamb.h: multi-tensor LAMB on CUDA tensors.
// fused_lamb_step is one whole step (zeal.optim.FusedLamb). The two phases are separate for a
// caller whose tensors are split across ranks (ZeRO): it adds the other ranks' sums into
// norm_sums (an all-reduce) between them. Launches run on the legacy default stream, after the
// caller's kernels there. Available when Zeal is built with CUDA (zeal/features.h).
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/optim/cpu_optim.h"

namespace zeal::optim {

// Moments of every tensor updated; the sums of p^2 and u^2 of tensor i are added into
// norm_sums[2 * slots[i]] and [2 * slots[i] + 1] (float64 on the tensors' device, zeroed by the caller).
void fused_lamb_phase1(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq,
                       const std::vector<int>& slots, const AdamHyper& hyper, const at::Tensor& norm_sums);
// p -= lr * clamp(||p|| / ||u||, min_coeff, max_coeff) * u, the norms from norm_sums.
void fused_lamb_phase2(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avg,
                       const std::vector<at::Tensor>& exp_avg_sq, const std::vector<int>& slots, const AdamHyper& hyper,
                       double min_coeff, double max_coeff, const at::Tensor& norm_sums);
void fused_lamb_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq,
                     const AdamHyper& hyper, double min_coeff, double max_coeff);

}  // namespace zeal::optim
