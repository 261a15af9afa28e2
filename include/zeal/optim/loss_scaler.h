// fp16 loss scaling with DeepSpeed's semantics (deepspeed/runtime/fp16/loss_scaler.py). Dynamic: the
// scale starts at 2^initial_scale_power and doubles when the clean steps since the last overflow,
// not counting the current one, are a positive multiple of loss_scale_window (the first growth
// after window + 1 clean steps). Under ZeRO (DeepSpeed's DynamicLossScaler) an overflow halves the
// scale once `hysteresis` overflows have been absorbed, never below min_loss_scale, and an
// overflow at the minimum is an error; without ZeRO (DeepSpeed's FP16_Optimizer) every overflow
// halves it, down to min_loss_scale, and hysteresis is not used. Static: a fixed loss_scale.
// bf16/fp32: 1, never updated.
#pragma once

#include <cstdint>

#include "zeal/core/config.h"

namespace zeal::optim {

class LossScaler {
 public:
  LossScaler() = default;
  // zero: the engine partitions (ZeRO stage >= 1), which selects DeepSpeed's ZeRO behaviour.
  LossScaler(const Fp16Config& config, bool zero);

  double scale() const { return scale_; }
  bool dynamic() const { return dynamic_; }
  // Records one optimizer-step attempt; `overflow` means its gradients had an inf or NaN.
  void update(bool overflow);

  // What a checkpoint keeps of it.
  struct State {
    double scale = 1.0;
    int64_t current_hysteresis = 1;
    int64_t iteration = 0;
    int64_t last_overflow_iteration = -1;
  };
  State state() const { return {scale_, current_hysteresis_, iteration_, last_overflow_iteration_}; }
  void restore(const State& s) {
    scale_ = s.scale;
    current_hysteresis_ = s.current_hysteresis;
    iteration_ = s.iteration;
    last_overflow_iteration_ = s.last_overflow_iteration;
  }

 private:
  bool dynamic_ = false;
  bool zero_ = false;
  double scale_ = 1.0;
  double min_scale_ = 1.0;
  int64_t window_ = 1000;
  int64_t hysteresis_ = 1;
  bool consecutive_hysteresis_ = false;
  int64_t current_hysteresis_ = 1;
  int64_t iteration_ = 0;
  int64_t last_overflow_iteration_ = -1;
};

}  // namespace zeal::optim
