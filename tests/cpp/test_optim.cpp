#include <gtest/gtest.h>

#include <cmath>

#include <ATen/ATen.h>

#include "zeal/core/error.h"
#include "zeal/optim/loss_scaler.h"
#include "zeal/optim/lr_scheduler.h"
#include "zeal/optim/optimizer.h"

using namespace zeal;

namespace {

optim::LossScaler dynamic_scaler(int power, int window, int hysteresis, double min_scale = 1.0, bool zero = true) {
  Fp16Config c;
  c.enabled = true;
  c.initial_scale_power = power;
  c.loss_scale_window = window;
  c.hysteresis = hysteresis;
  c.min_loss_scale = min_scale;
  return optim::LossScaler(c, zero);
}

}  // namespace

TEST(LossScaler, DoublesAfterWindowHalvesOnOverflow) {
  auto s = dynamic_scaler(4, 3, 1);
  EXPECT_EQ(s.scale(), 16.0);
  // DeepSpeed counts the clean steps since the overflow without the current one
  // (stable_interval = iteration - last_overflow - 1): the scale grows at 3, 6, ... of them.
  std::vector<bool> overflow = {false, false, false, false, true, false, false, false, false, true};
  std::vector<double> want = {16, 16, 16, 32, 16, 16, 16, 16, 32, 16};
  for (size_t i = 0; i < overflow.size(); ++i) {
    s.update(overflow[i]);
    EXPECT_EQ(s.scale(), want[i]) << "after update " << i;
  }
}

TEST(LossScaler, DeepSpeedWindowTwoFromTwoToTheEight) {
  // DeepSpeed's tests/unit/runtime/half_precision/test_dynamic_loss_scale.py: window 2 from 2^8.
  auto s = dynamic_scaler(8, 2, 2);
  std::vector<double> after;
  for (int i = 0; i < 6; ++i) {
    s.update(false);
    after.push_back(s.scale());
  }
  EXPECT_EQ(after, (std::vector<double>{256, 256, 512, 512, 1024, 1024}));
}

TEST(LossScaler, WithoutZeroNoHysteresisAndNoErrorAtMinimum) {
  // DeepSpeed's FP16_Optimizer: every overflow halves, down to min_loss_scale, and never raises.
  auto s = dynamic_scaler(3, 1000, 2, 2.0, /*zero=*/false);
  s.update(true);
  EXPECT_EQ(s.scale(), 4.0);
  s.update(true);
  EXPECT_EQ(s.scale(), 2.0);
  EXPECT_NO_THROW(s.update(true));
  EXPECT_EQ(s.scale(), 2.0);
}

TEST(LossScaler, HysteresisAbsorbsOverflows) {
  auto s = dynamic_scaler(10, 1000, 2);
  s.update(true);
  EXPECT_EQ(s.scale(), 1024.0);  // first overflow absorbed
  s.update(true);
  EXPECT_EQ(s.scale(), 512.0);
  s.update(true);
  EXPECT_EQ(s.scale(), 256.0);  // hysteresis stays spent until a window completes
}

TEST(LossScaler, MinimumAndStatic) {
  auto s = dynamic_scaler(1, 1000, 1, 1.0);
  s.update(true);
  EXPECT_EQ(s.scale(), 1.0);
  EXPECT_THROW(s.update(true), Error);
  Fp16Config c;
  c.enabled = true;
  c.loss_scale = 128;
  optim::LossScaler fixed(c, true);
  fixed.update(true);
  EXPECT_EQ(fixed.scale(), 128.0);
  EXPECT_FALSE(fixed.dynamic());
}

TEST(LrSchedule, WarmupLogLinearAndDecay) {
  SchedulerConfig c;
  c.type = SchedulerType::kWarmupLR;
  c.warmup_min_lr = 0.0;
  c.warmup_max_lr = 0.1;
  c.warmup_num_steps = 10;
  auto s = optim::make_lr_schedule(c);
  EXPECT_DOUBLE_EQ(s->lr(-1, 1.0), 0.0);
  EXPECT_DOUBLE_EQ(s->lr(0, 1.0), 0.0);
  EXPECT_NEAR(s->lr(4, 1.0), 0.1 * std::log(5.0) / std::log(10.0), 1e-15);
  EXPECT_DOUBLE_EQ(s->lr(50, 1.0), 0.1);
  c.warmup_log = false;
  c.type = SchedulerType::kWarmupDecayLR;
  c.total_num_steps = 20;
  s = optim::make_lr_schedule(c);
  EXPECT_NEAR(s->lr(5, 1.0), 0.05, 1e-15);
  EXPECT_NEAR(s->lr(15, 1.0), 0.1 * 5.0 / 10.0, 1e-15);
  EXPECT_DOUBLE_EQ(s->lr(25, 1.0), 0.0);
}

TEST(LrSchedule, WarmupLRDefaultsMaxToOptimizerLr) {
  SchedulerConfig c;
  c.warmup_num_steps = 4;
  c.warmup_log = false;
  auto s = optim::make_lr_schedule(c);
  EXPECT_DOUBLE_EQ(s->lr(2, 0.4), 0.2);
}

TEST(LrSchedule, WarmupCosine) {
  SchedulerConfig c;
  c.type = SchedulerType::kWarmupCosineLR;
  c.warmup_num_steps = 2;
  c.warmup_log = false;
  c.total_num_steps = 12;
  c.cos_min_ratio = 0.1;
  auto s = optim::make_lr_schedule(c);
  EXPECT_DOUBLE_EQ(s->lr(-1, 2.0), 0.0);
  EXPECT_DOUBLE_EQ(s->lr(1, 2.0), 1.0);
  // iteration 6: progress (6-2+1)/10 = 0.5 -> ratio 0.1 + 0.9 * 0.5
  EXPECT_NEAR(s->lr(6, 2.0), 2.0 * (0.1 + 0.9 * 0.5), 1e-12);
  EXPECT_NEAR(s->lr(100, 2.0), 0.2, 1e-12);
}

TEST(LrSchedule, OneCycleAndRangeTest) {
  SchedulerConfig c;
  c.type = SchedulerType::kOneCycle;
  c.cycle_min_lr = 0.1;
  c.cycle_max_lr = 1.1;
  c.cycle_first_step_size = 4;
  c.decay_lr_rate = 0.5;
  c.decay_step_size = 2;
  auto s = optim::make_lr_schedule(c);
  EXPECT_DOUBLE_EQ(s->lr(-1, 0.0), 0.1);
  EXPECT_NEAR(s->lr(1, 0.0), 0.1 + 1.0 * 0.5, 1e-12);   // batch 2 of 4 up
  EXPECT_NEAR(s->lr(3, 0.0), 1.1, 1e-12);               // peak
  EXPECT_NEAR(s->lr(5, 0.0), 0.1 + 1.0 * 0.5, 1e-12);   // halfway down
  EXPECT_NEAR(s->lr(9, 0.0), 0.1 / (1 + 0.5 * 1.0), 1e-12);  // decay interval (9-8+1)/2
  EXPECT_NEAR(*s->beta1(3), 0.8, 1e-12);
  c.type = SchedulerType::kLRRangeTest;
  c.lr_range_test_min_lr = 0.01;
  c.lr_range_test_step_size = 4;
  c.lr_range_test_step_rate = 2.0;
  c.lr_range_test_staircase = true;
  s = optim::make_lr_schedule(c);
  EXPECT_DOUBLE_EQ(s->lr(2, 0.0), 0.01);
  EXPECT_DOUBLE_EQ(s->lr(3, 0.0), 0.03);
}

TEST(Optimizer, AdamWMatchesClosedFormFirstStep) {
  OptimizerConfig c;
  c.type = OptimizerType::kAdamW;
  auto opt = optim::make_optimizer(c, 3);
  at::Tensor p = at::tensor({1.0f, -2.0f, 0.5f});
  at::Tensor g = at::tensor({0.1f, -0.3f, 0.0f});
  std::vector<optim::ParamGroup> groups{{0, 3, 0.01, 0.1, {0.9, 0.999}, 1e-8, 0.0}};
  at::Tensor before = p.clone();
  opt->step(p, g, groups);
  // Step 1: m_hat = g, v_hat = g^2 -> update = lr * g / (|g| + eps); decay first.
  at::Tensor want = before * (1 - 0.01 * 0.1) - 0.01 * g / (g.abs() + 1e-8);
  EXPECT_TRUE(at::allclose(p, want, 1e-6, 1e-7)) << p << want;
}

TEST(Optimizer, SgdMomentumGroupsKeepTheirOwnRange) {
  OptimizerConfig c;
  c.type = OptimizerType::kSgd;
  auto opt = optim::make_optimizer(c, 4);
  at::Tensor p = at::zeros({4});
  at::Tensor g = at::ones({4});
  std::vector<optim::ParamGroup> groups{{0, 2, 0.1, 0.0, {0.9, 0.999}, 1e-8, 0.5}, {2, 4, 1.0, 0.0, {0.9, 0.999}, 1e-8, 0.0}};
  opt->step(p, g, groups);
  opt->step(p, g, groups);
  // group 0: buf 1 then 1.5 -> p = -0.1 - 0.15; group 1: plain SGD lr 1 -> p = -2
  EXPECT_NEAR(p[0].item<float>(), -0.25f, 1e-6);
  EXPECT_NEAR(p[3].item<float>(), -2.0f, 1e-6);
}
