#include "zeal/optim/cpu_adam.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/adam.h"
#include "zeal/core/error.h"

namespace zeal::optim {
namespace {

void check_fp32_cpu(const at::Tensor& t, const char* what, int64_t n) {
  ZEAL_CHECK(t.defined(), "CPU Adam: ", what, " is undefined");
  ZEAL_CHECK(t.device().is_cpu(), "CPU Adam: ", what, " is on ", t.device().str(),
             "; this optimizer updates CPU tensors (use FusedAdam for device tensors)");
  ZEAL_CHECK(t.scalar_type() == at::kFloat, "CPU Adam: ", what, " has dtype ", c10::toString(t.scalar_type()),
             "; it needs float32 (keep fp32 master weights and states)");
  ZEAL_CHECK(t.is_contiguous(), "CPU Adam: ", what, " is not contiguous");
  ZEAL_CHECK(t.numel() == n, "CPU Adam: ", what, " has ", t.numel(), " elements, the parameters ", n);
}

// Pieces big enough to amortise a thread's start, small enough to balance across cores.
constexpr int64_t kGrain = 1 << 16;

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
  base.lr = h.lr;
  base.beta1 = h.beta1;
  base.beta2 = h.beta2;
  base.eps = h.eps;
  base.weight_decay = h.weight_decay;
  base.decoupled = h.decoupled;
  if (h.bias_correction) {
    base.bias_correction1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
    base.bias_correction2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
  }
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
  auto run = [&](int64_t begin, int64_t end) {
    kernels::AdamArgs a = base;
    a.params = p + begin;
    a.grads = g + begin;
    a.exp_avg = m + begin;
    a.exp_avg_sq = v + begin;
    if (base.param_copy) a.param_copy = base.param_copy + begin;
    a.n = end - begin;
    kernels::adam_step(a, isa);
  };
  // Note [Own threads]: at::parallel_for is inline OpenMP in the headers and runs serially in a
  // library built without -fopenmp, and linking a second OpenMP runtime beside torch's is worse.
  // So: as many threads as torch's intra-op setting allows, each on one contiguous, 64-element-
  // aligned piece; the calling thread takes the first.
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + kGrain - 1) / kGrain);
  if (threads <= 1) {
    run(0, n);
    return;
  }
  const int64_t piece = ((n + threads - 1) / threads + 63) / 64 * 64;
  std::vector<std::thread> workers;
  for (int64_t t = 1; t < threads; ++t) {
    int64_t begin = std::min(n, t * piece), end = std::min(n, (t + 1) * piece);
    if (begin < end) workers.emplace_back(run, begin, end);
  }
  run(0, std::min(n, piece));
  for (auto& w : workers) w.join();
}

}  // namespace zeal::optim
