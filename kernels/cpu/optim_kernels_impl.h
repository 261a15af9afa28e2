// The Adam loop, written once; optim_kernels_{scalar,avx2,avx512}.cpp compile it with different target
// flags and the compiler vectorises it for each. Included only by those files.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/optim_kernels.h"

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
  const float b1 = static_cast<float>(a.beta1), one_minus_b1 = static_cast<float>(1.0 - a.beta1);
  const float b2 = static_cast<float>(a.beta2), one_minus_b2 = static_cast<float>(1.0 - a.beta2);
  const float neg_step_size = static_cast<float>(-(a.lr / a.bias_correction1));
  const float inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(a.bias_correction2));
  const float eps = static_cast<float>(a.eps), wd = static_cast<float>(a.weight_decay);
  const float decay = static_cast<float>(1.0 - a.lr * a.weight_decay);
  const int64_t n = a.n;
#pragma GCC ivdep
#pragma GCC unroll 4
  for (int64_t i = 0; i < n; ++i) {
    float grad = g[i];
    float param = p[i];
    if constexpr (kDecoupled) {
      param *= decay;
    } else {
      grad += wd * param;
    }
    const float mi = b1 * m[i] + one_minus_b1 * grad;
    const float vi = v[i] * b2 + one_minus_b2 * grad * grad;
    // One division per element (torch divides twice): the loop is memory-bound only while the
    // divider keeps up, and two AVX-512 divisions plus a square root per 16 elements do not on
    // every CPU. The result differs from torch's by about one rounding (< 1e-6 relative).
    const float denom = std::sqrt(vi) * inv_bc2_sqrt + eps;
    param += (neg_step_size * mi) / denom;
    m[i] = mi;
    v[i] = vi;
    p[i] = param;
    if constexpr (kCopy == 1) out[i] = to_bf16(param);
    if constexpr (kCopy == 2) out[i] = to_fp16(param);
  }
}

inline void adagrad_loop(const AdagradArgs& a) {
  float* __restrict p = a.params;
  const float* __restrict g = a.grads;
  float* __restrict sum = a.state_sum;
  const float neg_clr = static_cast<float>(-a.clr), eps = static_cast<float>(a.eps);
  const float wd = static_cast<float>(a.weight_decay);
#pragma GCC ivdep
  for (int64_t i = 0; i < a.n; ++i) {
    const float grad = g[i] + wd * p[i];
    const float s = sum[i] + grad * grad;
    sum[i] = s;
    p[i] += neg_clr * (grad / (std::sqrt(s) + eps));
  }
}

template <bool kMomentum, bool kNesterov, bool kFirst>
void sgd_loop(const SgdArgs& a) {
  float* __restrict p = a.params;
  const float* __restrict g = a.grads;
  float* __restrict buf = a.momentum_buffer;
  const float lr = static_cast<float>(a.lr), mu = static_cast<float>(a.momentum);
  const float keep = static_cast<float>(1.0 - a.dampening), wd = static_cast<float>(a.weight_decay);
#pragma GCC ivdep
  for (int64_t i = 0; i < a.n; ++i) {
    float d = g[i] + wd * p[i];
    if constexpr (kMomentum) {
      const float b = kFirst ? d : buf[i] * mu + keep * d;
      buf[i] = b;
      d = kNesterov ? d + mu * b : b;
    }
    p[i] -= lr * d;
  }
}

// u = m_hat / (sqrt(v_hat) + eps) + wd * p, from the updated moments.
struct LambConstants {
  float b1, one_minus_b1, b2, one_minus_b2, inv_bc1, inv_bc2, eps, wd;
  explicit LambConstants(const LambArgs& a)
      : b1(static_cast<float>(a.beta1)), one_minus_b1(static_cast<float>(1.0 - a.beta1)),
        b2(static_cast<float>(a.beta2)), one_minus_b2(static_cast<float>(1.0 - a.beta2)),
        inv_bc1(static_cast<float>(1.0 / a.bias_correction1)), inv_bc2(static_cast<float>(1.0 / a.bias_correction2)),
        eps(static_cast<float>(a.eps)), wd(static_cast<float>(a.weight_decay)) {}
  float update(float m, float v, float p) const { return (m * inv_bc1) / (std::sqrt(v * inv_bc2) + eps) + wd * p; }
};

inline NormSums lamb_phase1_loop(const LambArgs& a) {
  float* __restrict p = a.params;
  const float* __restrict g = a.grads;
  float* __restrict m = a.exp_avg;
  float* __restrict v = a.exp_avg_sq;
  const LambConstants c(a);
  // Sums in float per block of 4096 (vectorisable), accumulated in double across blocks.
  NormSums out;
  for (int64_t start = 0; start < a.n; start += 4096) {
    const int64_t end = std::min<int64_t>(a.n, start + 4096);
    float psq = 0.0f, usq = 0.0f;
#pragma omp simd reduction(+ : psq, usq)
    for (int64_t i = start; i < end; ++i) {
      const float mi = c.b1 * m[i] + c.one_minus_b1 * g[i];
      const float vi = c.b2 * v[i] + c.one_minus_b2 * g[i] * g[i];
      m[i] = mi;
      v[i] = vi;
      const float u = c.update(mi, vi, p[i]);
      psq += p[i] * p[i];
      usq += u * u;
    }
    out.param_sq += psq;
    out.update_sq += usq;
  }
  return out;
}

inline void lamb_phase2_loop(const LambArgs& a, double trust_ratio) {
  float* __restrict p = a.params;
  const float* __restrict m = a.exp_avg;
  const float* __restrict v = a.exp_avg_sq;
  const LambConstants c(a);
  const float step = static_cast<float>(-a.lr * trust_ratio);
#pragma GCC ivdep
  for (int64_t i = 0; i < a.n; ++i) p[i] += step * c.update(m[i], v[i], p[i]);
}

template <bool kScale>
double unscale_sum_squares_loop(const UnscaleArgs& a) {
  float* __restrict g = a.grads;
  const float s = a.inv_scale;
  double total = 0.0;
  for (int64_t start = 0; start < a.n; start += 4096) {
    const int64_t end = std::min<int64_t>(a.n, start + 4096);
    float block = 0.0f;
#pragma omp simd reduction(+ : block)
    for (int64_t i = start; i < end; ++i) {
      float x = g[i];
      if constexpr (kScale) {
        x *= s;
        g[i] = x;
      }
      block += x * x;
    }
    total += block;
  }
  return total;
}

inline double unscale_sum_squares_dispatch(const UnscaleArgs& a) {
  return a.inv_scale == 1.0f ? unscale_sum_squares_loop<false>(a) : unscale_sum_squares_loop<true>(a);
}

inline void triad_loop(const TriadArgs& t) {
  float* __restrict a = t.a;
  const float* __restrict b = t.b;
  const float* __restrict c = t.c;
  const float s = t.scalar;
  if (t.in_place) {
#pragma GCC ivdep
    for (int64_t i = 0; i < t.n; ++i) a[i] += s * b[i];
  } else {
#pragma GCC ivdep
    for (int64_t i = 0; i < t.n; ++i) a[i] = b[i] + s * c[i];
  }
}

inline void sgd_dispatch(const SgdArgs& a) {
  if (!a.momentum_buffer || a.momentum == 0.0) return sgd_loop<false, false, false>(a);
  if (a.nesterov) return a.first_step ? sgd_loop<true, true, true>(a) : sgd_loop<true, true, false>(a);
  return a.first_step ? sgd_loop<true, false, true>(a) : sgd_loop<true, false, false>(a);
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
