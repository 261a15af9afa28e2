// Learning-rate schedules with DeepSpeed's names, parameters and formulas. Pure functions of the
// scheduler's iteration count: the engine asks for the lr after each applied optimizer step
// (iteration 0, 1, ...) and once at start (iteration -1, DeepSpeed's initial value).
#pragma once

#include <memory>
#include <optional>

#include "zeal/core/config.h"

namespace zeal::optim {

class LrSchedule {
 public:
  virtual ~LrSchedule() = default;
  // The lr of a group whose optimizer lr is `base_lr`, at scheduler iteration `iteration`.
  virtual double lr(int64_t iteration, double base_lr) const = 0;
  // OneCycle also cycles Adam's beta1; the others leave it alone.
  virtual std::optional<double> beta1(int64_t iteration) const { return std::nullopt; }
};

std::unique_ptr<LrSchedule> make_lr_schedule(const SchedulerConfig& config);

}  // namespace zeal::optim
