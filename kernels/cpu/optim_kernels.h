// Optimizer steps over flat fp32 buffers on the CPU (Adam / AdamW, Adagrad, SGD with momentum,
// LAMB), vectorised for the best instruction set the running CPU has (AVX-512, AVX2 + FMA, or
// scalar), chosen at run time: the build never assumes the build machine's CPU. Each call is
// single-threaded over [0, n); callers split larger buffers across threads (optim/cpu_optim.cpp).
// Adam optionally writes the updated parameters' fp16 / bf16 copy in the same pass (the
// model-dtype weights of mixed precision and of the offload path).
// A leaf: pointers and sizes only, no torch headers.
//
// Order of operations: torch.optim.Adam / AdamW's single-tensor path (lerp, addcmul, addcdiv) with
// three changes that keep the loop memory-bound (the results differ from torch's by about one
// rounding, < 1e-6 relative): m as beta1 * m + (1 - beta1) * g instead of torch's two-branch lerp,
// the denominator multiplied by 1 / sqrt(bias_correction2), and one division instead of two:
//   g = grad (+ wd * p when coupled);  p *= 1 - lr * wd when decoupled
//   m = beta1 * m + (1 - beta1) * g;  v = v * beta2 + (1 - beta2) * g * g
//   p += (-(lr / bias_correction1) * m) / (sqrt(v) * (1 / sqrt(bias_correction2)) + eps)
#pragma once

#include <cstdint>

#include "cpu/half_reduce.h"

namespace zeal::kernels {

enum class Isa { kScalar, kAvx2, kAvx512 };

struct AdamArgs {
  float* params = nullptr;
  const float* grads = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  uint16_t* param_copy = nullptr;  // optional 16-bit copy of the updated params
  HalfKind copy_kind = HalfKind::kBf16;
  int64_t n = 0;
  // Hyper-parameters in double: the derived scalars (1 - lr * wd, lr / bias_correction1, ...) are
  // formed in double and rounded to float once, as torch forms them from Python floats.
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double bias_correction1 = 1.0;  // 1 - beta1^step, or 1 without bias correction
  double bias_correction2 = 1.0;
  bool decoupled = true;           // AdamW's weight decay (else L2 added to the gradient)
};

// The widest instruction set this CPU supports (and the kernel was compiled for).
Isa best_isa();
const char* isa_name(Isa isa);
bool isa_supported(Isa isa);

// Host contract: buffers hold n elements, do not overlap, n >= 0. `isa` must be supported.
void adam_step(const AdamArgs& args, Isa isa);

// Adagrad as torch.optim.Adagrad: g (+ wd * p); sum += g * g; p -= clr * g / (sqrt(sum) + eps),
// clr = lr / (1 + (step - 1) * lr_decay) formed by the caller.
struct AdagradArgs {
  float* params = nullptr;
  const float* grads = nullptr;
  float* state_sum = nullptr;
  int64_t n = 0;
  double clr = 1e-2;
  double eps = 1e-10;
  double weight_decay = 0.0;
};
void adagrad_step(const AdagradArgs& args, Isa isa);

// SGD as torch.optim.SGD: d = g (+ wd * p); with momentum, buf = first ? d : buf * momentum +
// (1 - dampening) * d and d = nesterov ? d + momentum * buf : buf; p -= lr * d.
struct SgdArgs {
  float* params = nullptr;
  const float* grads = nullptr;
  float* momentum_buffer = nullptr;  // null without momentum
  int64_t n = 0;
  double lr = 1e-2;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool first_step = false;
};
void sgd_step(const SgdArgs& args, Isa isa);

// LAMB over one tensor, in two passes. Phase 1 updates the moments and returns the partial sums
// of p^2 and u^2, u = m_hat / (sqrt(v_hat) + eps) + wd * p; the caller combines the sums of all
// pieces of the tensor into the trust ratio ||p|| / ||u|| (clamped), and phase 2 recomputes u and
// applies p -= lr * ratio * u. Bias corrections as in AdamArgs.
struct LambArgs {
  float* params = nullptr;
  const float* grads = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  int64_t n = 0;
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-6;
  double weight_decay = 0.0;
  double bias_correction1 = 1.0;
  double bias_correction2 = 1.0;
};
struct NormSums {
  double param_sq = 0.0;
  double update_sq = 0.0;
};
NormSums lamb_phase1(const LambArgs& args, Isa isa);
void lamb_phase2(const LambArgs& args, double trust_ratio, Isa isa);

// The mixed-precision path before the optimizer: grads *= inv_scale (not written when inv_scale is
// 1) and the sum of squares of the result, in one pass. Summed in float per block of 4096 elements
// and in double across blocks; inf or NaN when any gradient is.
struct UnscaleArgs {
  float* grads = nullptr;
  int64_t n = 0;
  float inv_scale = 1.0f;
};
double unscale_sum_squares(const UnscaleArgs& args, Isa isa);

// The memory-bandwidth roofline the optimizer benchmarks compare against (benchmarks/optim.py):
// STREAM's triad a = b + s * c (in_place false), or a += s * b (in_place true: read-modify-write,
// the optimizers' access pattern, with no write-allocate traffic for a line not read).
struct TriadArgs {
  float* a = nullptr;
  const float* b = nullptr;
  const float* c = nullptr;
  int64_t n = 0;
  float scalar = 3.0f;
  bool in_place = false;
};
void triad(const TriadArgs& args, Isa isa);

}  // namespace zeal::kernels
