// Plain loops the compiler vectorises (built with the kernels' vector flags, -ffp-contract=off:
// every build rounds the same way). The byte loops work on 8 elements at a time so that the
// packing and unpacking compile to compares and shifts without branches.
#include "cpu/onebit.h"

#include <cmath>

namespace zeal::kernels {

double onebit_scale(const float* x, const float* error, int64_t n_valid) {
  if (n_valid <= 0) return 0.0;
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n_valid; ++i) {
    const float c = x[i] + error[i];
    sum += static_cast<double>(c) * static_cast<double>(c);
  }
  return std::sqrt(sum / static_cast<double>(n_valid));
}

void onebit_pack(const float* x, float* error, float scale, uint8_t* bits, int64_t n_valid, int64_t n_total) {
  for (int64_t b = 0; b < n_total / 8; ++b) {
    uint8_t byte = 0;
    for (int k = 0; k < 8; ++k) {
      const int64_t i = 8 * b + k;
      if (i >= n_valid) {
        error[i] = 0.0f;
        continue;
      }
      const float c = x[i] + error[i];
      const bool positive = c >= 0.0f;
      byte = static_cast<uint8_t>(byte | (positive ? 1u << k : 0u));
      error[i] = c - (positive ? scale : -scale);
    }
    bits[b] = byte;
  }
}

void onebit_unpack(const uint8_t* bits, float scale, float* out, int64_t n, bool accumulate) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = ((bits[i >> 3] >> (i & 7)) & 1u) ? scale : -scale;
    out[i] = accumulate ? out[i] + v : v;
  }
}

}  // namespace zeal::kernels
