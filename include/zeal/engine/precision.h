// The precision policy of a step (DESIGN.md: the engine is a composition of small parts): unscale
// the gradients, the global gradient norm, fp16 overflow and the agreement on it, clipping, and
// the loss scale. It owns the loss scaler and its rules; the sums across ranks come from the
// engine, which knows the groups (Note [Parameter placement]), through the two callbacks.
#pragma once

#include <functional>

#include <ATen/core/Tensor.h>

#include "zeal/core/config.h"
#include "zeal/optim/loss_scaler.h"

namespace zeal::engine {

class PrecisionPolicy {
 public:
  PrecisionPolicy() = default;
  // partitioned: ZeRO stage >= 1 (the scaler's DeepSpeed defaults differ by stage).
  PrecisionPolicy(const Config& config, bool partitioned);

  double loss_scale() const { return scaler_.scale(); }
  bool dynamic() const { return scaler_.dynamic(); }
  optim::LossScaler& scaler() { return scaler_; }
  const optim::LossScaler& scaler() const { return scaler_; }
  // fp16 (its overflow check) and clipping need the global norm; otherwise a step skips it.
  bool computes_grad_norm() const { return fp16_ || clipping_ > 0.0; }

  struct Verdict {
    bool overflow = false;   // skip the step (fp16 only)
    double grad_norm = 0.0;  // the unscaled global norm, when computes_grad_norm()
  };
  // Unscales `grads` (fp32, this rank's) in place and judges them. global_sum_squares(grads,
  // inv_scale) unscales and returns the whole model's sum of squares (each value once);
  // any_rank(flag) says whether any rank's flag is set (for optimizers whose gradients are each
  // rank's own, whose overflow every rank must agree on), or null when gradients are reduced.
  Verdict judge(at::Tensor& grads, const std::function<double(at::Tensor&, double)>& global_sum_squares,
                const std::function<bool(bool)>& any_rank) const;
  // The same over gradients held in several buffers (one per sharded-state unit): sum_squares(inv_scale)
  // unscales them all and returns the whole model's sum of squares; unscale(inv_scale) only unscales
  // (when no norm is needed).
  Verdict judge(const std::function<double(double)>& sum_squares, const std::function<void(double)>& unscale,
                const std::function<bool(bool)>& any_rank) const;
  // Scales `grads` so that their norm (the whole model's: grad_norm) is at most gradient_clipping
  // (no-op without clipping).
  void clip(at::Tensor& grads, double grad_norm) const;
  // After the step: grows the scale after enough clean steps, shrinks it on overflow.
  void update(bool overflow) { scaler_.update(overflow); }

 private:
  optim::LossScaler scaler_;
  bool fp16_ = false;
  double clipping_ = 0.0;
};

}  // namespace zeal::engine
