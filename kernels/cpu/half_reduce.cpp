#include "cpu/half_reduce.h"

#include <cmath>
#include <cstring>

namespace zeal::kernels {
namespace {

float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

uint16_t float_to_bf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if (std::isnan(value)) return 0x7fc0;
  // Round to nearest, ties to even, on the 16 dropped bits.
  uint32_t rounding = 0x7fff + ((word >> 16) & 1);
  return static_cast<uint16_t>((word + rounding) >> 16);
}

float fp16_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, sizeof(h));
  return static_cast<float>(h);
}

uint16_t float_to_fp16(float value) {
  _Float16 h = static_cast<_Float16>(value);  // IEEE round to nearest even
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
}

template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float)>
void reduce_loop(HalfReduce op, const uint16_t* in, uint16_t* inout, size_t count) {
  switch (op) {
    case HalfReduce::kSum:
      for (size_t i = 0; i < count; ++i) inout[i] = FromFloat(ToFloat(inout[i]) + ToFloat(in[i]));
      break;
    case HalfReduce::kMax:
      for (size_t i = 0; i < count; ++i) inout[i] = FromFloat(std::fmax(ToFloat(inout[i]), ToFloat(in[i])));
      break;
    case HalfReduce::kMin:
      for (size_t i = 0; i < count; ++i) inout[i] = FromFloat(std::fmin(ToFloat(inout[i]), ToFloat(in[i])));
      break;
  }
}

}  // namespace

void half_reduce(HalfKind kind, HalfReduce op, const uint16_t* in, uint16_t* inout, size_t count) {
  if (kind == HalfKind::kBf16)
    reduce_loop<bf16_to_float, float_to_bf16>(op, in, inout, count);
  else
    reduce_loop<fp16_to_float, float_to_fp16>(op, in, inout, count);
}

float half_to_float(HalfKind kind, uint16_t bits) {
  return kind == HalfKind::kBf16 ? bf16_to_float(bits) : fp16_to_float(bits);
}

uint16_t float_to_half(HalfKind kind, float value) {
  return kind == HalfKind::kBf16 ? float_to_bf16(value) : float_to_fp16(value);
}

}  // namespace zeal::kernels
