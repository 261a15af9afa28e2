// The precision policy alone (engine/precision.h): unscale, norm, overflow agreement, clipping and
// the loss scale, with the cross-rank sums supplied by the test.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include <ATen/ATen.h>

#include "zeal/core/config.h"
#include "zeal/engine/precision.h"

using zeal::Config;
using zeal::engine::PrecisionPolicy;

namespace {

Config fp16_config(double clipping) {
  return Config::from_string(R"({"train_batch_size": 1, "gradient_clipping": )" + std::to_string(clipping) +
                             R"(, "fp16": {"enabled": true, "initial_scale_power": 4, "hysteresis": 1}})");
}

// Unscale in place and the sum of squares, as the engine's callback does over one rank.
double sum_squares(at::Tensor& g, double inv_scale) {
  g.mul_(inv_scale);
  return g.to(at::kDouble).pow(2).sum().item<double>();
}

}  // namespace

TEST(PrecisionPolicy, UnscalesNormsAndClips) {
  PrecisionPolicy p(fp16_config(1.0), /*partitioned=*/true);
  ASSERT_EQ(p.loss_scale(), 16.0);
  at::Tensor g = at::tensor({3.0f * 16, 4.0f * 16});
  PrecisionPolicy::Verdict v = p.judge(g, sum_squares, nullptr);
  EXPECT_FALSE(v.overflow);
  EXPECT_NEAR(v.grad_norm, 5.0, 1e-9);
  EXPECT_NEAR(g[1].item<float>(), 4.0f, 1e-6);
  p.clip(g, v.grad_norm);  // to norm 1
  EXPECT_NEAR(g[0].item<float>(), 0.6f, 1e-5);
  EXPECT_NEAR(g[1].item<float>(), 0.8f, 1e-5);
}

TEST(PrecisionPolicy, OverflowSkipsAndHalvesTheScale) {
  PrecisionPolicy p(fp16_config(0.0), true);
  ASSERT_TRUE(p.computes_grad_norm());  // fp16 needs the norm for its overflow check
  at::Tensor g = at::tensor({1.0f, std::numeric_limits<float>::infinity()});
  EXPECT_TRUE(p.judge(g, sum_squares, nullptr).overflow);
  p.update(true);
  EXPECT_EQ(p.loss_scale(), 8.0);
  // Another rank's overflow is this rank's too (optimizers with rank-local gradients).
  at::Tensor fine = at::tensor({1.0f, 2.0f});
  EXPECT_TRUE(p.judge(fine, sum_squares, [](bool) { return true; }).overflow);
  EXPECT_FALSE(p.judge(fine, sum_squares, [](bool mine) { return mine; }).overflow);
}

TEST(PrecisionPolicy, Fp32WithoutClippingSkipsTheNorm) {
  PrecisionPolicy p(Config::from_string(R"({"train_batch_size": 1})"), false);
  EXPECT_FALSE(p.computes_grad_norm());
  at::Tensor g = at::tensor({2.0f});
  bool called = false;
  PrecisionPolicy::Verdict v = p.judge(g, [&](at::Tensor&, double) { called = true; return 0.0; }, nullptr);
  EXPECT_FALSE(called);
  EXPECT_FALSE(v.overflow);
  EXPECT_EQ(g[0].item<float>(), 2.0f);  // scale 1: untouched
}
