#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "cpu/half_reduce.h"
#include "cpu/onebit.h"
#include "cpu/quantize.h"

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

// Block quantization (kernels/cpu/quantize.h) against a float64 reference: every size and block
// boundary (1, 7, 8, 9, 4099 elements; blocks that cut the tensor anywhere), 8 and 4 bits, with
// and without error feedback.
namespace {

int level_of(const std::vector<uint8_t>& q, int bits, int64_t i) {
  if (bits == 8) return static_cast<int8_t>(q[i]);
  const int nib = (i % 2 ? q[i / 2] >> 4 : q[i / 2]) & 0xF;
  return nib >= 8 ? nib - 16 : nib;
}

std::vector<float> values(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n);
  for (auto& v : x) v = normal(gen) * (seed % 3 == 0 ? 1e-3f : 4.0f);
  return x;
}

// Checks one quantize_blocks call's output against the float64 definition: each block's scale is
// amax / qmax, each level the nearest integer of c / scale (either neighbour where c / scale is
// within 1e-4 of a half, since the kernel rounds c * (qmax / amax) in fp32), |level| <= qmax, the
// value sent within half a step of c, and the error c - level * scale (LoCo, beta > 0: its moving
// average beta * error_before + (1 - beta) * (c - level * scale)).
void check_against_reference(const std::vector<float>& x, const std::vector<float>& error_before,
                             const std::vector<float>* error_after, int64_t block, int bits,
                             const std::vector<uint8_t>& q, const std::vector<float>& scales, double beta = 0.0) {
  const int64_t n = static_cast<int64_t>(x.size());
  const double qmax = bits == 8 ? 127.0 : 7.0;
  for (int64_t start = 0, b = 0; start < n; start += block, ++b) {
    const int64_t end = std::min(n, start + block);
    double amax = 0.0;
    for (int64_t i = start; i < end; ++i)
      amax = std::max(amax, std::fabs(static_cast<double>(x[i]) + static_cast<double>(error_before[i])));
    const double scale = amax / qmax;
    ASSERT_NEAR(scales[b], scale, scale * 1e-6) << "block " << b << " of " << n << " in blocks of " << block;
    for (int64_t i = start; i < end; ++i) {
      // c as the kernel forms it: x + error rounded to fp32
      const double c = static_cast<double>(static_cast<float>(x[i] + error_before[i]));
      const int level = level_of(q, bits, i);
      ASSERT_LE(std::abs(level), qmax);
      if (scale == 0.0) {
        ASSERT_EQ(level, 0);
        continue;
      }
      const double exact = c / scale;
      const double nearest = std::nearbyint(exact);
      if (std::fabs(std::fabs(exact - std::trunc(exact)) - 0.5) > 1e-4)
        ASSERT_EQ(level, nearest) << "element " << i << " of " << n << ": " << exact;
      else
        ASSERT_LE(std::fabs(level - exact), 0.5 + 1e-4) << "element " << i;
      ASSERT_LE(std::fabs(c - level * static_cast<double>(scales[b])), 0.5 * scale * (1 + 1e-5) + 1e-30);
      const double residual = c - level * static_cast<double>(scales[b]);
      if (error_after)
        ASSERT_NEAR((*error_after)[i], beta * error_before[i] + (1.0 - beta) * residual, 1e-6 * amax)  // fp32 rounding
            << "error of element " << i << " (beta " << beta << ")";
    }
  }
}

}  // namespace

TEST(Quantize, BlocksOfEverySizeMatchTheFloat64Reference) {
  for (int bits : {8, 4}) {
    for (int64_t n : {1, 7, 8, 9, 64, 4099}) {
      for (int64_t block : {2, 8, 64, 128, 2048}) {
        for (float beta : {-1.0f, 0.0f, 0.8f}) {  // -1: no error feedback; 0.8: LoCo's moving average
          const bool feedback = beta >= 0.0f;
          const std::vector<float> x = values(n, static_cast<uint32_t>(n * 31 + block + bits));
          std::vector<float> error(n, 0.0f);
          if (feedback) error = values(n, static_cast<uint32_t>(n + 7));
          for (auto& e : error) e *= 0.01f;
          const std::vector<float> before = error;
          std::vector<uint8_t> q(quantized_bytes(n, bits), 0xAA);
          std::vector<float> scales(quantized_blocks(n, block), -1.0f);
          quantize_blocks(x.data(), feedback ? error.data() : nullptr, n, block, bits, q.data(), scales.data(),
                          feedback ? beta : 0.0f);
          check_against_reference(x, before, feedback ? &error : nullptr, block, bits, q, scales, feedback ? beta : 0.0);
          if (bits == 4 && n % 2) EXPECT_EQ(q.back() >> 4, 0) << "the unused high nibble";
          // dequantize: level * scale, written or added
          std::vector<float> out(n, 1.0f);
          dequantize_blocks(q.data(), scales.data(), n, block, bits, out.data(), false);
          std::vector<float> acc(n, 1.0f);
          dequantize_blocks(q.data(), scales.data(), n, block, bits, acc.data(), true);
          for (int64_t i = 0; i < n; ++i) {
            const float want = static_cast<float>(level_of(q, bits, i)) * scales[i / block];
            ASSERT_EQ(out[i], want) << "dequantized element " << i;
            ASSERT_EQ(acc[i], 1.0f + want) << "accumulated element " << i;
          }
        }
      }
    }
  }
}

TEST(Quantize, ErrorFeedbackCarriesWhatWasLost) {
  // A constant signal far below one step of its block: without feedback it is sent as 0 forever;
  // with feedback the sum of what was sent tracks the sum of the signal within one step.
  const int64_t n = 4;
  const float x[n] = {100.0f, 0.3f, 0.3f, 0.3f};  // scale 100 / 7: 0.3 rounds to 0
  std::vector<float> error(n, 0.0f), sent(n, 0.0f);
  uint8_t q[2];
  float scale;
  for (int step = 0; step < 200; ++step) {
    quantize_blocks(x, error.data(), n, n, 4, q, &scale);
    dequantize_blocks(q, &scale, n, n, 4, sent.data(), true);
  }
  for (int64_t i = 1; i < n; ++i) {
    EXPECT_NEAR(sent[i], 200 * 0.3, 100.0 / 7.0) << "element " << i;
    EXPECT_GT(sent[i], 0.0f);
  }
}

TEST(Quantize, ZeroBlocksSendZerosAndNonFiniteBlocksArriveAsNaN) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float x[12] = {0, 0, 0, 0, 1, nan, 2, 3, -inf, 1, 2, 3};
  for (int bits : {8, 4}) {
    std::vector<float> error(12, 0.5f);
    error[0] = error[1] = error[2] = error[3] = 0.0f;
    std::vector<uint8_t> q(quantized_bytes(12, bits));
    float scales[3];
    quantize_blocks(x, error.data(), 12, 4, bits, q.data(), scales);
    EXPECT_EQ(scales[0], 0.0f);
    EXPECT_TRUE(std::isnan(scales[1]));
    EXPECT_TRUE(std::isnan(scales[2]));
    for (int i = 4; i < 12; ++i) EXPECT_EQ(error[i], 0.5f) << "a non-finite block keeps its error";
    std::vector<float> out(12);
    dequantize_blocks(q.data(), scales, 12, 4, bits, out.data(), false);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], 0.0f);
    for (int i = 4; i < 12; ++i) EXPECT_TRUE(std::isnan(out[i])) << "element " << i;
  }
}
