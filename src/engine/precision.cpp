#include "zeal/engine/precision.h"

#include <cmath>

namespace zeal::engine {

PrecisionPolicy::PrecisionPolicy(const Config& config, bool partitioned)
    : scaler_(config.fp16, partitioned),
      fp16_(config.precision() == Precision::kFp16),
      clipping_(config.gradient_clipping) {}

PrecisionPolicy::Verdict PrecisionPolicy::judge(at::Tensor& grads,
                                                const std::function<double(at::Tensor&, double)>& global_sum_squares,
                                                const std::function<bool(bool)>& any_rank) const {
  return judge([&](double inv_scale) { return global_sum_squares(grads, inv_scale); },
               [&](double inv_scale) { grads.mul_(inv_scale); }, any_rank);
}

PrecisionPolicy::Verdict PrecisionPolicy::judge(const std::function<double(double)>& sum_squares,
                                                const std::function<void(double)>& unscale,
                                                const std::function<bool(bool)>& any_rank) const {
  Verdict v;
  const double inv_scale = 1.0 / scaler_.scale();
  if (computes_grad_norm()) {
    // One pass: unscale and the sum of squares (optim/cpu_optim.h); a non-finite norm is fp16's overflow.
    v.grad_norm = std::sqrt(sum_squares(inv_scale));
    v.overflow = fp16_ && !std::isfinite(v.grad_norm);
  } else if (inv_scale != 1.0) {
    unscale(inv_scale);
  }
  if (fp16_ && any_rank) v.overflow = any_rank(v.overflow);
  return v;
}

void PrecisionPolicy::clip(at::Tensor& grads, double grad_norm) const {
  if (clipping_ <= 0.0) return;
  const double coef = clipping_ / (grad_norm + 1e-6);
  if (coef < 1.0) grads.mul_(coef);
}

}  // namespace zeal::engine
