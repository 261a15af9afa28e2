// Element-wise reductions on 16-bit floats stored as raw bits, for backends whose wire has no
// native fp16/bf16 type (MPI). Each pair of elements is widened to fp32, combined, and rounded
// back to nearest-even, so a sum is the correctly rounded 16-bit result of the fp32 sum.
// A leaf: pointers and sizes only, no torch headers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace zeal::kernels {

enum class HalfKind { kFp16, kBf16 };
enum class HalfReduce { kSum, kMax, kMin };

// inout[i] = inout[i] (op) in[i] for i in [0, count).
void half_reduce(HalfKind kind, HalfReduce op, const uint16_t* in, uint16_t* inout, size_t count);

float half_to_float(HalfKind kind, uint16_t bits);
uint16_t float_to_half(HalfKind kind, float value);

}  // namespace zeal::kernels
