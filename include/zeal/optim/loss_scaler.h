// fp16 loss scaling with DeepSpeed's semantics. Dynamic: the scale starts at
// 2^initial_scale_power, halves on an overflow once `hysteresis` overflows have been absorbed
// (never below min_loss_scale; an overflow at the minimum is an error), and doubles after
// loss_scale_window consecutive clean steps. Static: a fixed loss_scale. bf16/fp32: 1, never updated.
#pragma once

#include <cstdint>

#include "zeal/core/config.h"

namespace zeal::optim {

class LossScaler {
 public:
  LossScaler() = default;
  explicit LossScaler(const Fp16Config& config);

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
