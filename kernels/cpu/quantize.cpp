#include "cpu/quantize.h"

#include <algorithm>
#include <cmath>

namespace zeal::kernels {
namespace {

// The block's scale and the factor that maps it onto [-qmax, qmax]; both 0 for a block of zeros.
// beta and keep = 1 - beta: the error feedback's moving average (beta 0: the residual alone).
struct BlockScale {
  float scale;
  float inv;
  float beta = 0.0f;
  float keep = 1.0f;
};

// The error carried to the next quantization: the residual r, or its moving average with LoCo.
inline float feedback(float old_error, float r, BlockScale s) {
  if (s.beta == 0.0f) return r;
  const float kept = s.beta * old_error;
  const float added = s.keep * r;
  return kept + added;
}

BlockScale block_scale(float amax, float qmax) {
  if (!(amax > 0.0f)) return {0.0f, 0.0f};
  return {amax / qmax, qmax / amax};
}

// The largest |c| of the block, c = x (+ error); NaN when some c is not finite (c * 0 is NaN just
// for those), so that a NaN or inf is never quantized into a finite value.
float max_abs(const float* x, const float* error, int64_t n) {
  float amax = 0.0f, probe = 0.0f;
  if (error) {
#pragma omp simd reduction(max : amax) reduction(+ : probe)
    for (int64_t i = 0; i < n; ++i) {
      const float c = x[i] + error[i];
      amax = std::max(amax, std::fabs(c));
      probe += c * 0.0f;
    }
  } else {
#pragma omp simd reduction(max : amax) reduction(+ : probe)
    for (int64_t i = 0; i < n; ++i) {
      amax = std::max(amax, std::fabs(x[i]));
      probe += x[i] * 0.0f;
    }
  }
  return probe == 0.0f ? amax : NAN;
}

// q for value c, and (with error feedback) the residual c - q * scale.
inline float level(float c, BlockScale s, float qmax) {
  return std::min(qmax, std::max(-qmax, std::nearbyint(c * s.inv)));
}

void quantize8(const float* x, float* error, int64_t n, BlockScale s, int8_t* q) {
  const float qmax = 127.0f;
  if (error) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float c = x[i] + error[i];
      const float v = level(c, s, qmax);
      q[i] = static_cast<int8_t>(v);
      error[i] = feedback(error[i], c - v * s.scale, s);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(level(x[i], s, qmax));
  }
}

uint8_t nibble(float v) { return static_cast<uint8_t>(static_cast<int>(v) & 0xF); }

void quantize4(const float* x, float* error, int64_t n, BlockScale s, uint8_t* q) {
  const float qmax = 7.0f;
  const int64_t pairs = n / 2;
#pragma omp simd
  for (int64_t j = 0; j < pairs; ++j) {
    const float c0 = error ? x[2 * j] + error[2 * j] : x[2 * j];
    const float c1 = error ? x[2 * j + 1] + error[2 * j + 1] : x[2 * j + 1];
    const float v0 = level(c0, s, qmax), v1 = level(c1, s, qmax);
    q[j] = static_cast<uint8_t>(nibble(v0) | (nibble(v1) << 4));
    if (error) {
      error[2 * j] = feedback(error[2 * j], c0 - v0 * s.scale, s);
      error[2 * j + 1] = feedback(error[2 * j + 1], c1 - v1 * s.scale, s);
    }
  }
  if (n % 2) {  // the last element of an odd block (only the tensor's last block can be odd)
    const float c = error ? x[n - 1] + error[n - 1] : x[n - 1];
    const float v = level(c, s, qmax);
    q[pairs] = nibble(v);
    if (error) error[n - 1] = feedback(error[n - 1], c - v * s.scale, s);
  }
}

inline float from_nibble(uint8_t b) { return static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4); }

}  // namespace

void quantize_blocks(const float* x, float* error, int64_t n, int64_t block, int bits, uint8_t* q, float* scales,
                     float error_beta) {
  const float qmax = bits == 8 ? 127.0f : 7.0f;
  const float keep = 1.0f - error_beta;
  for (int64_t b = 0, start = 0; start < n; ++b, start += block) {
    const int64_t len = std::min(block, n - start);
    const float amax = max_abs(x + start, error ? error + start : nullptr, len);
    if (std::isnan(amax)) {  // a block with a NaN or inf arrives as NaNs; its error stays as it was
      scales[b] = NAN;
      std::fill(q + (bits == 8 ? start : start / 2), q + (bits == 8 ? start + len : (start + len + 1) / 2), uint8_t{0});
      continue;
    }
    BlockScale s = block_scale(amax, qmax);
    s.beta = error_beta;
    s.keep = keep;
    scales[b] = s.scale;
    if (bits == 8)
      quantize8(x + start, error ? error + start : nullptr, len, s, reinterpret_cast<int8_t*>(q) + start);
    else
      quantize4(x + start, error ? error + start : nullptr, len, s, q + start / 2);
  }
}

void dequantize_blocks(const uint8_t* q, const float* scales, int64_t n, int64_t block, int bits, float* out,
                       bool accumulate) {
  for (int64_t b = 0, start = 0; start < n; ++b, start += block) {
    const int64_t len = std::min(block, n - start);
    const float s = scales[b];
    float* o = out + start;
    if (bits == 8) {
      const int8_t* v = reinterpret_cast<const int8_t*>(q) + start;
      if (accumulate) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) o[i] += static_cast<float>(v[i]) * s;
      } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) o[i] = static_cast<float>(v[i]) * s;
      }
    } else {
      const uint8_t* v = q + start / 2;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const uint8_t byte = v[i / 2];
        const float d = from_nibble(i % 2 ? static_cast<uint8_t>(byte >> 4) : byte) * s;
        o[i] = accumulate ? o[i] + d : d;
      }
    }
  }
}

}  // namespace zeal::kernels
