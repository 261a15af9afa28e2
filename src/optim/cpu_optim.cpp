#include "zeal/optim/cpu_optim.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/optim_kernels.h"
#include "zeal/core/error.h"
#include "optim/parallel_pieces.h"

namespace zeal::optim {
namespace {

void check_fp32_cpu(const char* who, const at::Tensor& t, const char* what, int64_t n) {
  ZEAL_CHECK(t.defined(), who, ": ", what, " is undefined");
  ZEAL_CHECK(t.device().is_cpu(), who, ": ", what, " is on ", t.device().str(),
             "; this optimizer updates CPU tensors (device tensors need a device optimizer)");
  ZEAL_CHECK(t.scalar_type() == at::kFloat, who, ": ", what, " has dtype ", c10::toString(t.scalar_type()),
             "; it needs float32 (keep fp32 master weights and states)");
  ZEAL_CHECK(t.is_contiguous(), who, ": ", what, " is not contiguous");
  ZEAL_CHECK(t.numel() == n, who, ": ", what, " has ", t.numel(), " elements, the parameters ", n);
}

void check_fp32_cpu(const at::Tensor& t, const char* what, int64_t n) { check_fp32_cpu("CPU Adam", t, what, n); }

// The hyper-parameters Adam and LAMB share, bias corrections formed in double.
template <typename Args>
void set_adam_hyper(Args& a, const AdamHyper& h) {
  a.lr = h.lr;
  a.beta1 = h.beta1;
  a.beta2 = h.beta2;
  a.eps = h.eps;
  a.weight_decay = h.weight_decay;
  if (h.bias_correction) {
    a.bias_correction1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
    a.bias_correction2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
  }
}

}  // namespace

const char* cpu_adam_isa() { return kernels::isa_name(kernels::best_isa()); }

void cpu_adam_step(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq,
                   const AdamHyper& h, const at::Tensor* half_copy) {
  const int64_t n = params.numel();
  check_fp32_cpu(params, "the parameter", n);
  check_fp32_cpu(grads, "the gradient", n);
  check_fp32_cpu(exp_avg, "exp_avg", n);
  check_fp32_cpu(exp_avg_sq, "exp_avg_sq", n);
  kernels::AdamArgs base;
  if (half_copy && half_copy->defined()) {
    const at::ScalarType t = half_copy->scalar_type();
    ZEAL_CHECK(t == at::kHalf || t == at::kBFloat16, "CPU Adam: the 16-bit copy has dtype ", c10::toString(t),
               "; expected float16 or bfloat16");
    ZEAL_CHECK(half_copy->device().is_cpu() && half_copy->is_contiguous() && half_copy->numel() == n,
               "CPU Adam: the 16-bit copy must be a contiguous CPU tensor of ", n, " elements");
    base.param_copy = static_cast<uint16_t*>(half_copy->data_ptr());
    base.copy_kind = t == at::kHalf ? kernels::HalfKind::kFp16 : kernels::HalfKind::kBf16;
  }
  set_adam_hyper(base, h);
  base.decoupled = h.decoupled;
  float* p = params.data_ptr<float>();
  const float* g = grads.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  kernels::Isa isa = kernels::best_isa();
  if (h.isa) {
    bool found = false;
    for (kernels::Isa candidate : {kernels::Isa::kScalar, kernels::Isa::kAvx2, kernels::Isa::kAvx512}) {
      if (std::string(kernels::isa_name(candidate)) != h.isa) continue;
      ZEAL_CHECK(kernels::isa_supported(candidate), "CPU Adam: this CPU does not support ", h.isa);
      isa = candidate;
      found = true;
    }
    ZEAL_CHECK(found, "CPU Adam: unknown instruction set '", h.isa, "' (expected avx512, avx2 or scalar)");
  }
  parallel_pieces(n, [&](int64_t begin, int64_t end, int64_t) {
    kernels::AdamArgs a = base;
    a.params = p + begin;
    a.grads = g + begin;
    a.exp_avg = m + begin;
    a.exp_avg_sq = v + begin;
    if (base.param_copy) a.param_copy = base.param_copy + begin;
    a.n = end - begin;
    kernels::adam_step(a, isa);
  });
}

void cpu_adagrad_step(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& state_sum, double lr,
                      double lr_decay, double weight_decay, double eps, int64_t step) {
  const int64_t n = params.numel();
  check_fp32_cpu("CPU Adagrad", params, "the parameter", n);
  check_fp32_cpu("CPU Adagrad", grads, "the gradient", n);
  check_fp32_cpu("CPU Adagrad", state_sum, "the state sum", n);
  kernels::AdagradArgs base;
  base.clr = lr / (1.0 + static_cast<double>(step - 1) * lr_decay);
  base.eps = eps;
  base.weight_decay = weight_decay;
  float* p = params.data_ptr<float>();
  const float* g = grads.data_ptr<float>();
  float* s = state_sum.data_ptr<float>();
  const kernels::Isa isa = kernels::best_isa();
  parallel_pieces(n, [&](int64_t begin, int64_t end, int64_t) {
    kernels::AdagradArgs a = base;
    a.params = p + begin;
    a.grads = g + begin;
    a.state_sum = s + begin;
    a.n = end - begin;
    kernels::adagrad_step(a, isa);
  });
}

void cpu_sgd_step(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& momentum_buffer, double lr,
                  double momentum, double dampening, double weight_decay, bool nesterov, bool first_step) {
  const int64_t n = params.numel();
  check_fp32_cpu("CPU SGD", params, "the parameter", n);
  check_fp32_cpu("CPU SGD", grads, "the gradient", n);
  if (momentum != 0.0) check_fp32_cpu("CPU SGD", momentum_buffer, "the momentum buffer", n);
  kernels::SgdArgs base;
  base.lr = lr;
  base.momentum = momentum;
  base.dampening = dampening;
  base.weight_decay = weight_decay;
  base.nesterov = nesterov;
  base.first_step = first_step;
  float* p = params.data_ptr<float>();
  const float* g = grads.data_ptr<float>();
  float* buf = momentum != 0.0 ? momentum_buffer.data_ptr<float>() : nullptr;
  const kernels::Isa isa = kernels::best_isa();
  parallel_pieces(n, [&](int64_t begin, int64_t end, int64_t) {
    kernels::SgdArgs a = base;
    a.params = p + begin;
    a.grads = g + begin;
    a.momentum_buffer = buf ? buf + begin : nullptr;
    a.n = end - begin;
    kernels::sgd_step(a, isa);
  });
}

namespace {

kernels::LambArgs lamb_args(const at::Tensor& params, const at::Tensor* grads, const at::Tensor& exp_avg,
                            const at::Tensor& exp_avg_sq, const AdamHyper& h) {
  const int64_t n = params.numel();
  check_fp32_cpu("CPU LAMB", params, "the parameter", n);
  if (grads) check_fp32_cpu("CPU LAMB", *grads, "the gradient", n);
  check_fp32_cpu("CPU LAMB", exp_avg, "exp_avg", n);
  check_fp32_cpu("CPU LAMB", exp_avg_sq, "exp_avg_sq", n);
  kernels::LambArgs a;
  set_adam_hyper(a, h);
  a.params = params.data_ptr<float>();
  a.grads = grads ? grads->data_ptr<float>() : nullptr;
  a.exp_avg = exp_avg.data_ptr<float>();
  a.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  a.n = n;
  return a;
}

kernels::LambArgs piece_of(const kernels::LambArgs& whole, int64_t begin, int64_t end) {
  kernels::LambArgs a = whole;
  a.params += begin;
  if (a.grads) a.grads += begin;
  a.exp_avg += begin;
  a.exp_avg_sq += begin;
  a.n = end - begin;
  return a;
}

}  // namespace

LambSums cpu_lamb_phase1(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                         const at::Tensor& exp_avg_sq, const AdamHyper& h) {
  const kernels::LambArgs whole = lamb_args(params, &grads, exp_avg, exp_avg_sq, h);
  const kernels::Isa isa = kernels::best_isa();
  // The pieces' sums are combined in a fixed order, so the ratio does not depend on thread timing.
  std::vector<kernels::NormSums> sums(static_cast<size_t>(std::max(1, at::get_num_threads())));
  parallel_pieces(whole.n, [&](int64_t begin, int64_t end, int64_t t) {
    const kernels::NormSums tile = kernels::lamb_phase1(piece_of(whole, begin, end), isa);
    sums[t].param_sq += tile.param_sq;
    sums[t].update_sq += tile.update_sq;
  });
  LambSums out;
  for (const auto& s : sums) {
    out.param_sq += s.param_sq;
    out.update_sq += s.update_sq;
  }
  return out;
}

void cpu_lamb_phase2(const at::Tensor& params, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                     const AdamHyper& h, double trust_ratio) {
  const kernels::LambArgs whole = lamb_args(params, nullptr, exp_avg, exp_avg_sq, h);
  const kernels::Isa isa = kernels::best_isa();
  parallel_pieces(whole.n, [&](int64_t begin, int64_t end, int64_t) {
    kernels::lamb_phase2(piece_of(whole, begin, end), trust_ratio, isa);
  });
}

double lamb_trust_ratio(const LambSums& sums, double min_coeff, double max_coeff) {
  const double p_norm = std::sqrt(sums.param_sq), u_norm = std::sqrt(sums.update_sq);
  const double ratio = (p_norm > 0.0 && u_norm > 0.0) ? p_norm / u_norm : 1.0;
  return std::min(max_coeff, std::max(min_coeff, ratio));
}

double cpu_lamb_step(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const AdamHyper& h, double min_coeff, double max_coeff) {
  ZEAL_CHECK(min_coeff >= 0 && max_coeff >= min_coeff, "CPU LAMB: need 0 <= min_coeff <= max_coeff, got ",
             min_coeff, " and ", max_coeff);
  const double ratio = lamb_trust_ratio(cpu_lamb_phase1(params, grads, exp_avg, exp_avg_sq, h), min_coeff, max_coeff);
  cpu_lamb_phase2(params, exp_avg, exp_avg_sq, h, ratio);
  return ratio;
}

void cpu_triad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double scalar) {
  const int64_t n = a.numel();
  check_fp32_cpu("triad", a, "a", n);
  check_fp32_cpu("triad", b, "b", n);
  if (c.defined()) check_fp32_cpu("triad", c, "c", n);
  float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  const float* pc = c.defined() ? c.data_ptr<float>() : nullptr;
  const kernels::Isa isa = kernels::best_isa();
  parallel_pieces(n, [&](int64_t begin, int64_t end, int64_t) {
    kernels::TriadArgs t;
    t.a = pa + begin;
    t.b = pb + begin;
    t.c = pc ? pc + begin : nullptr;
    t.n = end - begin;
    t.scalar = static_cast<float>(scalar);
    t.in_place = pc == nullptr;
    kernels::triad(t, isa);
  });
}

}  // namespace zeal::optim
