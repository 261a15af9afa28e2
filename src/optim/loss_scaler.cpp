#include "zeal/optim/loss_scaler.h"

#include <algorithm>
#include <cmath>

#include "zeal/core/error.h"

namespace zeal::optim {

LossScaler::LossScaler(const Fp16Config& c, bool zero) {
  if (!c.enabled) return;
  zero_ = zero;
  dynamic_ = c.loss_scale == 0.0;
  scale_ = dynamic_ ? std::ldexp(1.0, static_cast<int>(c.initial_scale_power)) : c.loss_scale;
  min_scale_ = c.min_loss_scale;
  window_ = c.loss_scale_window;
  hysteresis_ = zero ? c.hysteresis : 1;  // DeepSpeed's fp16 optimizers (no ZeRO) have no hysteresis
  current_hysteresis_ = hysteresis_;
  consecutive_hysteresis_ = c.consecutive_hysteresis;
}

void LossScaler::update(bool overflow) {
  if (!dynamic_) return;
  if (overflow) {
    if (hysteresis_ == 1 || current_hysteresis_ == 1) {
      if (scale_ == min_scale_ && zero_)
        throw Error("fp16 loss scale is already at min_loss_scale (" + std::to_string(min_scale_) +
                    ") and the gradients still overflow; training cannot continue (lower the learning rate or use bf16)");
      scale_ = std::max(scale_ / 2.0, min_scale_);
    } else {
      --current_hysteresis_;
    }
    last_overflow_iteration_ = iteration_;
  } else {
    if (consecutive_hysteresis_) current_hysteresis_ = hysteresis_;
    // DeepSpeed counts the clean steps since the last overflow without the current one: the first
    // growth comes after window + 1 clean steps, later ones every window steps.
    const int64_t stable = iteration_ - last_overflow_iteration_ - 1;
    if (stable > 0 && stable % window_ == 0) {
      if (!consecutive_hysteresis_) current_hysteresis_ = hysteresis_;
      scale_ *= 2.0;
    }
  }
  ++iteration_;
}

}  // namespace zeal::optim
