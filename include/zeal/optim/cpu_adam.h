// The torch-aware adapter of kernels/cpu/adam.h: checks the tensors (exact messages), splits the
// elements across the intra-op thread pool, and calls the vectorised kernel on each piece.
#pragma once

#include <ATen/core/Tensor.h>

namespace zeal::optim {

struct AdamHyper {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = true;        // AdamW
  bool bias_correction = true;
  int64_t step = 1;             // 1-based, after incrementing
  const char* isa = nullptr;    // force "avx512", "avx2" or "scalar" (benchmarks, tests); null: the best
};

// One step on contiguous fp32 CPU tensors of equal size. half_copy, when defined, is a contiguous
// fp16 or bf16 CPU tensor of the same size that receives the updated parameters.
void cpu_adam_step(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq,
                   const AdamHyper& hyper, const at::Tensor* half_copy = nullptr);

const char* cpu_adam_isa();  // "avx512", "avx2" or "scalar": what cpu_adam_step runs on this CPU

}  // namespace zeal::optim
