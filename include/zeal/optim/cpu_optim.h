// The torch-aware adapters of kernels/cpu/optim_kernels.h: check the tensors (exact messages),
// split the elements across torch's intra-op thread count, and call the vectorised kernels.
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

const char* cpu_adam_isa();  // "avx512", "avx2" or "scalar": what the CPU optimizers run on this CPU

// torch.optim.Adagrad's step (`step` 1-based, after incrementing).
void cpu_adagrad_step(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& state_sum, double lr,
                      double lr_decay, double weight_decay, double eps, int64_t step);

// torch.optim.SGD's step; momentum_buffer may be undefined when momentum is 0.
void cpu_sgd_step(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& momentum_buffer, double lr,
                  double momentum, double dampening, double weight_decay, bool nesterov, bool first_step);

// LAMB on one tensor: Adam moments with bias correction, update u = m_hat / (sqrt(v_hat) + eps)
// + wd * p, trust ratio ||p|| / ||u|| clamped to [min_coeff, max_coeff] (1 when either norm is
// 0), p -= lr * ratio * u. Returns the trust ratio used.
double cpu_lamb_step(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const AdamHyper& hyper, double min_coeff, double max_coeff);

// LAMB in its two phases, for a tensor whose pieces live on several ranks (ZeRO partitions): phase
// 1 updates the moments of one piece and returns its sums of p^2 and u^2; the caller adds the sums
// of every piece of the tensor and applies the ratio with phase 2.
struct LambSums {
  double param_sq = 0.0;
  double update_sq = 0.0;
};
LambSums cpu_lamb_phase1(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                         const at::Tensor& exp_avg_sq, const AdamHyper& hyper);
void cpu_lamb_phase2(const at::Tensor& params, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                     const AdamHyper& hyper, double trust_ratio);
// ||p|| / ||u|| from the summed squares, clamped to [min_coeff, max_coeff]; 1 when either norm is 0.
double lamb_trust_ratio(const LambSums& sums, double min_coeff, double max_coeff);

// Mixed-precision unscaling fused with the gradient norm: grads *= inv_scale (skipped when it is
// 1) and the sum of squares of the result, in one pass over a contiguous fp32 tensor (CPU, or CUDA
// in a CUDA build). The sum is inf or NaN when any gradient is (fp16 overflow). Threads' partial
// sums are added in a fixed order, so the result does not depend on timing.
double unscale_and_sum_squares(const at::Tensor& grads, double inv_scale);

// The roofline for the CPU optimizers (benchmarks/optim.py), on the same threads and instruction
// set: a = b + scalar * c, or with c undefined a += scalar * b; contiguous fp32 CPU tensors.
void cpu_triad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double scalar);

}  // namespace zeal::optim
