#include "zeal/optim/lr_scheduler.h"

#include <algorithm>
#include <cmath>

#include "zeal/core/error.h"

namespace zeal::optim {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Warmup fraction in [0, 1] shared by the three warmup schedules.
double warmup_gamma(const SchedulerConfig& c, int64_t it, int64_t warmup_steps) {
  if (c.warmup_log) return std::log(static_cast<double>(it + 1)) / std::log(static_cast<double>(warmup_steps));
  return static_cast<double>(it) / static_cast<double>(warmup_steps);
}

class Warmup : public LrSchedule {
 public:
  explicit Warmup(const SchedulerConfig& c) : c_(c), warmup_steps_(std::max<int64_t>(2, c.warmup_num_steps)) {}

  double lr(int64_t it, double base_lr) const override {
    double min_lr = c_.warmup_min_lr;
    double max_lr = c_.warmup_max_lr.value_or(base_lr);
    if (it < 0) return min_lr;
    return min_lr + (max_lr - min_lr) * gamma(it);
  }

 private:
  double gamma(int64_t it) const {
    if (it < warmup_steps_) return warmup_gamma(c_, it, warmup_steps_);
    if (c_.type == SchedulerType::kWarmupLR) return 1.0;
    double remaining = static_cast<double>(c_.total_num_steps - it);
    double span = std::max(1.0, static_cast<double>(c_.total_num_steps - warmup_steps_));
    return std::max(0.0, remaining / span);
  }

  SchedulerConfig c_;
  int64_t warmup_steps_;
};

class WarmupCosine : public LrSchedule {
 public:
  explicit WarmupCosine(const SchedulerConfig& c) : c_(c), warmup_steps_(std::max<int64_t>(2, c.warmup_num_steps)) {}

  double lr(int64_t it, double base_lr) const override { return base_lr * ratio(it); }

 private:
  double ratio(int64_t it) const {
    if (it < 0) return 0.0;
    if (it < warmup_steps_)
      return c_.warmup_min_ratio + warmup_gamma(c_, it, warmup_steps_) * (1.0 - c_.warmup_min_ratio);
    double done = static_cast<double>(it - warmup_steps_ + 1);
    double total = static_cast<double>(std::max<int64_t>(1, c_.total_num_steps - warmup_steps_));
    double progress = std::min(1.0, done / total);
    double cosine = (1.0 + std::cos(kPi * progress)) / 2.0;
    return std::max(0.0, c_.cos_min_ratio + (1.0 - c_.cos_min_ratio) * cosine);
  }

  SchedulerConfig c_;
  int64_t warmup_steps_;
};

class OneCycle : public LrSchedule {
 public:
  explicit OneCycle(const SchedulerConfig& c)
      : c_(c),
        first_(c.cycle_first_step_size),
        second_(c.cycle_second_step_size.value_or(c.cycle_first_step_size)),
        total_(first_ + second_),
        step_ratio_(first_ / total_),
        second_stairs_(c.cycle_second_stair_count.value_or(c.cycle_first_stair_count)) {}

  double lr(int64_t it, double) const override {
    if (it < 0) return c_.cycle_min_lr;
    if (static_cast<double>(it) < total_) return c_.cycle_min_lr + (c_.cycle_max_lr - c_.cycle_min_lr) * scale(it);
    if (c_.decay_step_size == 0.0 || c_.decay_lr_rate == 0.0) return c_.cycle_min_lr;
    double interval = (static_cast<double>(it) - total_ + 1) / c_.decay_step_size;
    return c_.cycle_min_lr / (1.0 + c_.decay_lr_rate * interval);
  }

  std::optional<double> beta1(int64_t it) const override {
    if (!c_.cycle_momentum) return std::nullopt;
    if (it < 0) return c_.cycle_min_mom;
    if (static_cast<double>(it) < total_) return c_.cycle_max_mom - (c_.cycle_max_mom - c_.cycle_min_mom) * scale(it);
    if (c_.decay_step_size == 0.0 || c_.decay_mom_rate == 0.0) return c_.cycle_max_mom;
    double interval = (static_cast<double>(it) - total_ + 1) / c_.decay_step_size;
    return c_.cycle_max_mom * (1.0 + c_.decay_mom_rate * interval);
  }

 private:
  // Position within the cycle: 0 at its ends, 1 at the peak; stair counts quantize each half.
  double scale(int64_t it) const {
    double batch = static_cast<double>(it + 1);
    double cycle = std::floor(1.0 + batch / total_);
    double x = 1.0 + batch / total_ - cycle;
    double s;
    int64_t stairs;
    if (x <= step_ratio_) {
      s = x / step_ratio_;
      stairs = c_.cycle_first_stair_count;
    } else {
      s = (x - 1.0) / (step_ratio_ - 1.0);
      stairs = second_stairs_;
    }
    if (stairs > 0) {
      double within = std::fmod(batch, total_);
      double position = within <= first_ ? within * stairs / first_ : (total_ - within) * stairs / second_;
      s = std::floor(position) / static_cast<double>(stairs);
    }
    return s;
  }

  SchedulerConfig c_;
  double first_, second_, total_, step_ratio_;
  int64_t second_stairs_;
};

class LRRangeTest : public LrSchedule {
 public:
  explicit LRRangeTest(const SchedulerConfig& c) : c_(c) {}

  double lr(int64_t it, double) const override {
    if (it < 0) return c_.lr_range_test_min_lr;
    double interval = static_cast<double>(it + 1) / c_.lr_range_test_step_size;
    if (c_.lr_range_test_staircase) interval = std::floor(interval);
    return c_.lr_range_test_min_lr * (1.0 + c_.lr_range_test_step_rate * interval);
  }

 private:
  SchedulerConfig c_;
};

}  // namespace

std::unique_ptr<LrSchedule> make_lr_schedule(const SchedulerConfig& config) {
  switch (config.type) {
    case SchedulerType::kWarmupLR:
    case SchedulerType::kWarmupDecayLR: return std::make_unique<Warmup>(config);
    case SchedulerType::kWarmupCosineLR: return std::make_unique<WarmupCosine>(config);
    case SchedulerType::kOneCycle: return std::make_unique<OneCycle>(config);
    case SchedulerType::kLRRangeTest: return std::make_unique<LRRangeTest>(config);
  }
  ZEAL_INTERNAL_ASSERT(false, "unhandled scheduler type");
  return nullptr;
}

}  // namespace zeal::optim
