#include <gtest/gtest.h>

#include <cmath>

#include "cpu/half_reduce.h"
#include "cpu/onebit.h"

using namespace zeal::kernels;

TEST(HalfReduce, SumIsRoundedNotTruncated) {
  for (HalfKind kind : {HalfKind::kFp16, HalfKind::kBf16}) {
    // 1 + 1/3 is not representable: the result must be the nearest 16-bit value of the fp32 sum.
    uint16_t a[3] = {float_to_half(kind, 1.0f), float_to_half(kind, -2.5f), float_to_half(kind, 1000.0f)};
    uint16_t b[3] = {float_to_half(kind, 1.0f / 3.0f), float_to_half(kind, 0.75f), float_to_half(kind, 0.5f)};
    float want[3];
    for (int i = 0; i < 3; ++i)
      want[i] = half_to_float(kind, float_to_half(kind, half_to_float(kind, a[i]) + half_to_float(kind, b[i])));
    half_reduce(kind, HalfReduce::kSum, a, b, 3);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(half_to_float(kind, b[i]), want[i]);
    EXPECT_NEAR(half_to_float(kind, b[0]), 4.0 / 3.0, kind == HalfKind::kBf16 ? 1e-2 : 1e-3);
    EXPECT_EQ(half_to_float(kind, b[1]), -1.75f);
  }
}

TEST(HalfReduce, MaxMinAndRoundTrip) {
  for (HalfKind kind : {HalfKind::kFp16, HalfKind::kBf16}) {
    uint16_t a[2] = {float_to_half(kind, -3.0f), float_to_half(kind, 7.0f)};
    uint16_t b[2] = {float_to_half(kind, 2.0f), float_to_half(kind, -8.0f)};
    uint16_t c[2] = {b[0], b[1]};
    half_reduce(kind, HalfReduce::kMax, a, b, 2);
    half_reduce(kind, HalfReduce::kMin, a, c, 2);
    EXPECT_EQ(half_to_float(kind, b[0]), 2.0f);
    EXPECT_EQ(half_to_float(kind, b[1]), 7.0f);
    EXPECT_EQ(half_to_float(kind, c[0]), -3.0f);
    EXPECT_EQ(half_to_float(kind, c[1]), -8.0f);
  }
  EXPECT_EQ(float_to_half(HalfKind::kBf16, 1.0f), 0x3f80);
  EXPECT_EQ(float_to_half(HalfKind::kFp16, 1.0f), 0x3c00);
  EXPECT_TRUE(std::isinf(half_to_float(HalfKind::kFp16, float_to_half(HalfKind::kFp16, 70000.0f))));
}

// 1-bit compression (kernels/cpu/onebit.h): the bit layout, the error feedback and padding.
TEST(OneBit, PacksSignsLeastSignificantFirstAndKeepsTheLossAsError) {
  const float x[10] = {1.0f, -2.0f, 0.0f, 3.0f, -0.5f, 0.25f, -1.0f, 4.0f, -3.0f, 2.0f};
  float error[16] = {0};
  error[1] = 1.5f;  // c[1] = -0.5
  uint8_t bits[2] = {0xff, 0xff};
  const double scale = zeal::kernels::onebit_scale(x, error, 10);
  double sum = 0;
  for (int i = 0; i < 10; ++i) sum += (x[i] + error[i]) * (x[i] + error[i]);
  EXPECT_DOUBLE_EQ(scale, std::sqrt(sum / 10));
  const float s = static_cast<float>(scale);
  zeal::kernels::onebit_pack(x, error, s, bits, 10, 16);
  // c >= 0 at elements 0, 2 (zero counts as positive), 3, 5, 7 and 9.
  EXPECT_EQ(bits[0], 0b10101101);
  EXPECT_EQ(bits[1], 0b00000010);
  EXPECT_FLOAT_EQ(error[0], 1.0f - s);
  EXPECT_FLOAT_EQ(error[1], -0.5f + s);
  EXPECT_FLOAT_EQ(error[2], -s);
  for (int i = 10; i < 16; ++i) EXPECT_EQ(error[i], 0.0f) << "padding keeps no error";
  float out[10];
  zeal::kernels::onebit_unpack(bits, 2.0f, out, 10, false);
  const float want[10] = {2, -2, 2, 2, -2, 2, -2, 2, -2, 2};
  for (int i = 0; i < 10; ++i) EXPECT_EQ(out[i], want[i]) << i;
  zeal::kernels::onebit_unpack(bits, 1.0f, out, 10, true);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(out[i], 1.5f * want[i]) << i;
  EXPECT_EQ(zeal::kernels::onebit_scale(x, error, 0), 0.0);
}
