// The Adam loop, written once; adam_{scalar,avx2,avx512}.cpp compile it with different target
// flags and the compiler vectorises it for each. Included only by those files.
#pragma once

#include <cmath>
#include <cstring>

#include "cpu/adam.h"

namespace zeal::kernels::detail {

inline uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

inline uint16_t to_fp16(float x) {
  _Float16 h = static_cast<_Float16>(x);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

template <bool kDecoupled, int kCopy>  // kCopy: 0 none, 1 bf16, 2 fp16
void adam_loop(const AdamArgs& a) {
  float* __restrict p = a.params;
  const float* __restrict g = a.grads;
  float* __restrict m = a.exp_avg;
  float* __restrict v = a.exp_avg_sq;
  uint16_t* __restrict out = a.param_copy;
  const float weight = static_cast<float>(1.0 - a.beta1);  // lerp weight, as torch
  const bool small_weight = weight < 0.5f;
  const float b2 = static_cast<float>(a.beta2), one_minus_b2 = static_cast<float>(1.0 - a.beta2);
  const float neg_step_size = static_cast<float>(-(a.lr / a.bias_correction1));
  const float bc2_sqrt = static_cast<float>(std::sqrt(a.bias_correction2));
  const float eps = static_cast<float>(a.eps), wd = static_cast<float>(a.weight_decay);
  const float decay = static_cast<float>(1.0 - a.lr * a.weight_decay);
  const int64_t n = a.n;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float grad = g[i];
    float param = p[i];
    if constexpr (kDecoupled) {
      param *= decay;
    } else {
      grad += wd * param;
    }
    const float diff = grad - m[i];
    const float mi = small_weight ? m[i] + weight * diff : grad - diff * (1.0f - weight);
    const float vi = v[i] * b2 + one_minus_b2 * grad * grad;
    const float denom = std::sqrt(vi) / bc2_sqrt + eps;
    param += neg_step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
    p[i] = param;
    if constexpr (kCopy == 1) out[i] = to_bf16(param);
    if constexpr (kCopy == 2) out[i] = to_fp16(param);
  }
}

inline void adam_dispatch(const AdamArgs& a) {
  const int copy = a.param_copy == nullptr ? 0 : (a.copy_kind == HalfKind::kBf16 ? 1 : 2);
  if (a.decoupled) {
    if (copy == 0) return adam_loop<true, 0>(a);
    if (copy == 1) return adam_loop<true, 1>(a);
    return adam_loop<true, 2>(a);
  }
  if (copy == 0) return adam_loop<false, 0>(a);
  if (copy == 1) return adam_loop<false, 1>(a);
  return adam_loop<false, 2>(a);
}

}  // namespace zeal::kernels::detail
