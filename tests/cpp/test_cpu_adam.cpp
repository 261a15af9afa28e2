// The vectorised CPU Adam kernel, every instruction set this CPU has, against a float64 reference:
// sizes around every vector width (0, 1, 15, 16, 17, 31, 33, 1000003), Adam and AdamW, with and
// without weight decay and bias correction, and the fp16 / bf16 copy written in the same pass
// (which must equal torch's rounding of the updated fp32 parameters exactly).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>

#include "cpu/optim_kernels.h"
#include "zeal/core/error.h"
#include "zeal/optim/cpu_optim.h"

using zeal::kernels::AdamArgs;
using zeal::kernels::HalfKind;
using zeal::kernels::Isa;

namespace {

struct Case {
  bool decoupled;
  float weight_decay;
  bool bias_correction;
};

void reference(std::vector<double>& p, const std::vector<float>& g, std::vector<double>& m, std::vector<double>& v,
               const AdamArgs& a) {
  for (size_t i = 0; i < p.size(); ++i) {
    double grad = g[i];
    if (a.decoupled)
      p[i] *= 1.0 - a.lr * a.weight_decay;
    else
      grad += a.weight_decay * p[i];
    m[i] = a.beta1 * m[i] + (1.0 - a.beta1) * grad;
    v[i] = a.beta2 * v[i] + (1.0 - a.beta2) * grad * grad;
    double denom = std::sqrt(v[i]) / std::sqrt(a.bias_correction2) + a.eps;
    p[i] -= a.lr / a.bias_correction1 * m[i] / denom;
  }
}

}  // namespace

TEST(CpuAdam, EveryIsaMatchesFloat64Reference) {
  const std::vector<Isa> isas = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512};
  const std::vector<int64_t> sizes = {0, 1, 15, 16, 17, 31, 33, 1000003};
  const std::vector<Case> cases = {{true, 0.0f, true}, {true, 0.01f, true}, {false, 0.01f, true}, {true, 0.01f, false}};
  int tested = 0;
  for (Isa isa : isas) {
    if (!zeal::kernels::isa_supported(isa)) continue;
    for (int64_t n : sizes) {
      for (const Case& c : cases) {
        at::manual_seed(n + 7);
        at::Tensor p = at::randn({n}), g = at::randn({n}), m = at::randn({n}) * 0.1, v = at::rand({n}) * 0.1;
        std::vector<double> p64(p.data_ptr<float>(), p.data_ptr<float>() + n);
        std::vector<double> m64(m.data_ptr<float>(), m.data_ptr<float>() + n);
        std::vector<double> v64(v.data_ptr<float>(), v.data_ptr<float>() + n);
        std::vector<float> g32(g.data_ptr<float>(), g.data_ptr<float>() + n);
        at::Tensor bf16 = at::empty({n}, at::kBFloat16);
        AdamArgs a;
        a.params = p.data_ptr<float>();
        a.grads = g.data_ptr<float>();
        a.exp_avg = m.data_ptr<float>();
        a.exp_avg_sq = v.data_ptr<float>();
        a.param_copy = reinterpret_cast<uint16_t*>(bf16.data_ptr());
        a.copy_kind = HalfKind::kBf16;
        a.n = n;
        a.lr = 1e-2;
        a.weight_decay = c.weight_decay;
        a.decoupled = c.decoupled;
        if (c.bias_correction) {
          a.bias_correction1 = 1.0 - 0.9 * 0.9 * 0.9;  // step 3
          a.bias_correction2 = 1.0 - std::pow(0.999, 3.0);
        }
        reference(p64, g32, m64, v64, a);
        zeal::kernels::adam_step(a, isa);
        double worst = 0;
        for (int64_t i = 0; i < n; ++i) {
          double err = std::abs(p.data_ptr<float>()[i] - p64[i]) / std::max(1.0, std::abs(p64[i]));
          worst = std::max(worst, err);
          worst = std::max(worst, std::abs(m.data_ptr<float>()[i] - m64[i]) / std::max(1.0, std::abs(m64[i])));
        }
        EXPECT_LE(worst, 1e-6) << zeal::kernels::isa_name(isa) << " n=" << n << " decoupled=" << c.decoupled;
        EXPECT_TRUE(at::equal(bf16, p.to(at::kBFloat16))) << zeal::kernels::isa_name(isa) << " n=" << n;
        ++tested;
      }
    }
  }
  EXPECT_GE(tested, static_cast<int>(sizes.size() * cases.size()));
}

TEST(CpuAdam, Fp16CopyAndThreadedAdapter) {
  at::manual_seed(3);
  const int64_t n = 300001;  // several threads' pieces and a ragged tail
  at::Tensor p = at::randn({n}), g = at::randn({n}), m = at::zeros({n}), v = at::zeros({n});
  at::Tensor p_ref = p.clone(), m_ref = m.clone(), v_ref = v.clone();
  at::Tensor half = at::empty({n}, at::kHalf);
  zeal::optim::AdamHyper h;
  h.lr = 1e-3;
  h.weight_decay = 0.1;
  zeal::optim::cpu_adam_step(p, g, m, v, h, &half);
  AdamArgs a;
  a.params = p_ref.data_ptr<float>();
  a.grads = g.data_ptr<float>();
  a.exp_avg = m_ref.data_ptr<float>();
  a.exp_avg_sq = v_ref.data_ptr<float>();
  a.n = n;
  a.lr = 1e-3;
  a.weight_decay = 0.1;
  a.bias_correction1 = 1.0 - 0.9;
  a.bias_correction2 = 1.0 - 0.999;
  zeal::kernels::adam_step(a, Isa::kScalar);
  EXPECT_LE((p - p_ref).abs().max().item<float>(), 1e-6f);
  EXPECT_TRUE(at::equal(half, p.to(at::kHalf)));
}

TEST(CpuAdam, RejectsWrongDevicesDtypesAndSizes) {
  at::Tensor p = at::zeros({8}), g = at::zeros({8}), m = at::zeros({8}), v = at::zeros({8});
  zeal::optim::AdamHyper h;
  auto message = [&](const at::Tensor& pp, const at::Tensor& gg) -> std::string {
    try {
      zeal::optim::cpu_adam_step(pp, gg, m, v, h);
    } catch (const zeal::Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message(p.to(at::kDouble), g).find("dtype Double"), std::string::npos);
  EXPECT_NE(message(p, at::zeros({9})).find("9 elements"), std::string::npos);
  EXPECT_NE(message(p, at::zeros({16}).slice(0, 0, 16, 2)).find("not contiguous"), std::string::npos);
}

// The precision path's one pass and the roofline kernel, every instruction set, against float64.
TEST(CpuKernels, UnscaleSumSquaresAndTriadEveryIsa) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (!zeal::kernels::isa_supported(isa)) continue;
    for (int64_t n : {0, 1, 15, 17, 4097, 100003}) {
      for (float inv_scale : {1.0f, 1.0f / 1024}) {
        at::manual_seed(n);
        at::Tensor g = at::randn({n}) * 100;
        at::Tensor want = g * inv_scale;
        const double want_sum = want.to(at::kDouble).pow(2).sum().item<double>();
        zeal::kernels::UnscaleArgs a;
        a.grads = g.data_ptr<float>();
        a.n = n;
        a.inv_scale = inv_scale;
        const double got = zeal::kernels::unscale_sum_squares(a, isa);
        EXPECT_TRUE(at::equal(g, want)) << zeal::kernels::isa_name(isa) << " n=" << n;
        EXPECT_LE(std::abs(got - want_sum), 1e-6 * std::max(want_sum, 1e-30)) << zeal::kernels::isa_name(isa) << " n=" << n;
      }
      at::Tensor a = at::zeros({n}), b = at::randn({n}), c = at::randn({n});
      zeal::kernels::TriadArgs t;
      t.a = a.data_ptr<float>();
      t.b = b.data_ptr<float>();
      t.c = c.data_ptr<float>();
      t.n = n;
      t.scalar = 3.0f;
      zeal::kernels::triad(t, isa);
      // The vector builds fuse the multiply-add (one rounding, torch's reference rounds twice), so
      // sums near zero need an absolute tolerance.
      EXPECT_TRUE(at::allclose(a, b + 3.0 * c, 1e-5, 1e-5)) << zeal::kernels::isa_name(isa) << " n=" << n;
      t.in_place = true;
      t.c = nullptr;
      zeal::kernels::triad(t, isa);  // a += 3 b
      EXPECT_TRUE(at::allclose(a, 4.0 * b + 3.0 * c, 1e-5, 1e-5)) << zeal::kernels::isa_name(isa) << " n=" << n;
    }
  }
  // A non-finite gradient makes the sum non-finite: the fp16 overflow check.
  at::Tensor g = at::ones({1000});
  g[500] = std::numeric_limits<float>::infinity();
  zeal::kernels::UnscaleArgs a;
  a.grads = g.data_ptr<float>();
  a.n = 1000;
  EXPECT_FALSE(std::isfinite(zeal::kernels::unscale_sum_squares(a, zeal::kernels::best_isa())));
}
