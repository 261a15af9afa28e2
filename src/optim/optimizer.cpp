#include "zeal/optim/optimizer.h"

#include <cmath>

#include <ATen/ops/full.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/zeros.h>

#include "zeal/core/error.h"
#include "zeal/features.h"
#include "zeal/optim/cpu_optim.h"
#if ZEAL_WITH_CUDA
#include "zeal/optim/fused_adam.h"
#include "zeal/optim/fused_lamb.h"
#endif

namespace zeal::optim {
namespace {

// The two moments Adam and LAMB keep, flat fp32 over the owned elements.
class WithMoments : public Optimizer {
 public:
  WithMoments(int64_t n, at::Device device)
      : exp_avg_(at::zeros({n}, at::TensorOptions().dtype(at::kFloat).device(device))),
        exp_avg_sq_(at::zeros({n}, at::TensorOptions().dtype(at::kFloat).device(device))) {}
  std::vector<std::string> state_names() const override { return {"exp_avg", "exp_avg_sq"}; }
  at::Tensor& state(const std::string& name) override {
    if (name == "exp_avg") return exp_avg_;
    if (name == "exp_avg_sq") return exp_avg_sq_;
    throw CheckpointError(std::string(this->name()) + " has no state named '" + name + "'");
  }

 protected:
  at::Tensor exp_avg_, exp_avg_sq_;
};

// Adam with either L2 (coupled) or decoupled (AdamW) weight decay; torch.optim.Adam(W)'s order
// of operations, so results match the single-process torch reference.
class Adam : public WithMoments {
 public:
  Adam(bool decoupled, bool bias_correction, int64_t n, at::Device device, const char* name)
      : WithMoments(n, device), decoupled_(decoupled), bias_correction_(bias_correction), name_(name) {}

  void update(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) override {
    for (const ParamGroup& g : groups) {
      if (g.end == g.begin) continue;
      at::Tensor p = params.slice(0, g.begin, g.end);
      at::Tensor grad = grads.slice(0, g.begin, g.end);
      at::Tensor m = exp_avg_.slice(0, g.begin, g.end);
      at::Tensor v = exp_avg_sq_.slice(0, g.begin, g.end);
      const double b1 = g.betas[0], b2 = g.betas[1];
      const AdamHyper hyper{g.lr, b1, b2, g.eps, g.weight_decay, decoupled_, bias_correction_, step_};
      if (p.device().is_cpu()) {  // the vectorised, multithreaded kernel (kernels/cpu/optim_kernels.h)
        at::Tensor copy = model_copy_.defined() ? model_copy_.slice(0, g.begin, g.end) : at::Tensor();
        cpu_adam_step(p, grad.contiguous(), m, v, hyper, copy.defined() ? &copy : nullptr);
        continue;
      }
#if ZEAL_WITH_CUDA
      if (p.is_cuda()) {  // the multi-tensor fused kernel (kernels/cuda/fused_adam.h)
        fused_adam_step({p}, {grad.contiguous()}, {m}, {v}, hyper);
        continue;
      }
#endif
      if (g.weight_decay != 0.0) {
        if (decoupled_)
          p.mul_(1.0 - g.lr * g.weight_decay);
        else
          grad = grad.add(p, g.weight_decay);
      }
      m.lerp_(grad, 1.0 - b1);
      v.mul_(b2).addcmul_(grad, grad, 1.0 - b2);
      double bc1 = bias_correction_ ? 1.0 - std::pow(b1, static_cast<double>(step_)) : 1.0;
      double bc2 = bias_correction_ ? 1.0 - std::pow(b2, static_cast<double>(step_)) : 1.0;
      at::Tensor denom = v.sqrt().div_(std::sqrt(bc2)).add_(g.eps);
      p.addcdiv_(m, denom, -g.lr / bc1);
    }
  }

  const char* name() const override { return name_; }
  bool writes_model_copy() const override { return model_copy_.defined() && exp_avg_.device().is_cpu(); }

 private:
  bool decoupled_;
  bool bias_correction_;
  const char* name_;
};

// SGD with momentum, dampening, nesterov and L2 weight decay, as torch.optim.SGD.
class Sgd : public Optimizer {
 public:
  Sgd(double dampening, bool nesterov, int64_t n, at::Device device)
      : dampening_(dampening), nesterov_(nesterov), n_(n), device_(device) {}

  void update(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) override {
    bool first = step_ == 1;
    for (const ParamGroup& g : groups) {
      if (g.end == g.begin) continue;
      at::Tensor p = params.slice(0, g.begin, g.end);
      at::Tensor d_p = grads.slice(0, g.begin, g.end);
      if (g.momentum != 0.0 && !momentum_buffer_.defined())
        momentum_buffer_ = at::zeros({n_}, at::TensorOptions().dtype(at::kFloat).device(device_));
      at::Tensor buf = g.momentum != 0.0 ? momentum_buffer_.slice(0, g.begin, g.end) : at::Tensor();
      if (p.device().is_cpu()) {  // the vectorised kernel (kernels/cpu/optim_kernels.h)
        cpu_sgd_step(p, d_p.contiguous(), buf, g.lr, g.momentum, dampening_, g.weight_decay, nesterov_, first);
        continue;
      }
      if (g.weight_decay != 0.0) d_p = d_p.add(p, g.weight_decay);
      if (g.momentum != 0.0) {
        if (first)
          buf.copy_(d_p);
        else
          buf.mul_(g.momentum).add_(d_p, 1.0 - dampening_);
        d_p = nesterov_ ? d_p.add(buf, g.momentum) : buf;
      }
      p.add_(d_p, -g.lr);
    }
  }

  const char* name() const override { return "SGD"; }
  std::vector<std::string> state_names() const override {
    return momentum_buffer_.defined() ? std::vector<std::string>{"momentum_buffer"} : std::vector<std::string>{};
  }
  at::Tensor& state(const std::string& name) override {
    if (name != "momentum_buffer") throw CheckpointError("SGD has no state named '" + name + "'");
    if (!momentum_buffer_.defined())
      momentum_buffer_ = at::zeros({n_}, at::TensorOptions().dtype(at::kFloat).device(device_));
    return momentum_buffer_;
  }

 private:
  double dampening_;
  bool nesterov_;
  int64_t n_;
  at::Device device_;
  at::Tensor momentum_buffer_;
};

// LAMB with a trust ratio per parameter (DeepSpeed's FusedLamb): segments are parameter pieces.
// Phase 1 of every piece adds its sums of p^2 and u^2 into the parameter's pair of a float64
// vector; the vector is summed across ranks (a parameter's pieces may be owned by several); phase
// 2 applies each parameter's ratio.
class Lamb : public WithMoments {
 public:
  Lamb(bool bias_correction, double min_coeff, double max_coeff, int64_t n, int64_t num_tensors, at::Device device)
      : WithMoments(n, device),
        bias_correction_(bias_correction),
        min_coeff_(min_coeff),
        max_coeff_(max_coeff),
        num_tensors_(num_tensors) {}

  bool per_tensor() const override { return true; }

  void update(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& segments) override {
    const bool on_cpu = params.device().is_cpu();
    ZEAL_CHECK(on_cpu || ZEAL_WITH_CUDA, "Lamb: parameters on ", params.device().str(),
               " need Zeal built with CUDA");
    at::Tensor sums = at::zeros({2 * num_tensors_}, params.options().dtype(at::kDouble));
    std::vector<Piece> pieces;
    for (const ParamGroup& g : segments) {
      if (g.end == g.begin) continue;
      ZEAL_INTERNAL_ASSERT(g.tensor >= 0 && g.tensor < num_tensors_, "Lamb segment without its tensor");
      pieces.push_back({params.slice(0, g.begin, g.end), grads.slice(0, g.begin, g.end).contiguous(),
                        exp_avg_.slice(0, g.begin, g.end), exp_avg_sq_.slice(0, g.begin, g.end),
                        AdamHyper{g.lr, g.betas[0], g.betas[1], g.eps, g.weight_decay, true, bias_correction_, step_},
                        g.tensor});
    }
    if (on_cpu) {
      double* s = sums.data_ptr<double>();
      for (const Piece& k : pieces) {
        const LambSums piece_sums = cpu_lamb_phase1(k.p, k.g, k.m, k.v, k.hyper);
        s[2 * k.tensor] += piece_sums.param_sq;
        s[2 * k.tensor + 1] += piece_sums.update_sq;
      }
    } else {
#if ZEAL_WITH_CUDA
      // One multi-tensor launch per phase and parameter group, not one per piece.
      for_each_group(pieces, [&](const Lists& l, const AdamHyper& h) {
        fused_lamb_phase1(l.p, l.g, l.m, l.v, l.slots, h, sums);
      });
#endif
    }
    if (reduce_sums_) reduce_sums_(sums);
    if (on_cpu) {
      const double* s = sums.data_ptr<double>();
      for (const Piece& k : pieces) {
        const double ratio = lamb_trust_ratio({s[2 * k.tensor], s[2 * k.tensor + 1]}, min_coeff_, max_coeff_);
        cpu_lamb_phase2(k.p, k.m, k.v, k.hyper, ratio);
      }
    } else {
#if ZEAL_WITH_CUDA
      for_each_group(pieces, [&](const Lists& l, const AdamHyper& h) {
        fused_lamb_phase2(l.p, l.m, l.v, l.slots, h, min_coeff_, max_coeff_, sums);
      });
#endif
    }
  }

  const char* name() const override { return "Lamb"; }

 private:
  struct Piece {
    at::Tensor p, g, m, v;
    AdamHyper hyper;
    int64_t tensor;
  };
  struct Lists {
    std::vector<at::Tensor> p, g, m, v;
    std::vector<int> slots;
  };
  // The pieces as tensor lists, one list per distinct set of hyper-parameters (one per parameter
  // group), in the order the sets first appear.
  template <typename Fn>
  static void for_each_group(const std::vector<Piece>& pieces, const Fn& fn) {
    auto same = [](const AdamHyper& a, const AdamHyper& b) {
      return a.lr == b.lr && a.beta1 == b.beta1 && a.beta2 == b.beta2 && a.eps == b.eps &&
             a.weight_decay == b.weight_decay;
    };
    std::vector<bool> done(pieces.size(), false);
    for (size_t first = 0; first < pieces.size(); ++first) {
      if (done[first]) continue;
      Lists l;
      for (size_t k = first; k < pieces.size(); ++k) {
        if (done[k] || !same(pieces[k].hyper, pieces[first].hyper)) continue;
        done[k] = true;
        l.p.push_back(pieces[k].p);
        l.g.push_back(pieces[k].g);
        l.m.push_back(pieces[k].m);
        l.v.push_back(pieces[k].v);
        l.slots.push_back(static_cast<int>(pieces[k].tensor));
      }
      fn(l, pieces[first].hyper);
    }
  }
  bool bias_correction_;
  double min_coeff_, max_coeff_;
  int64_t num_tensors_;
};

// DeepSpeed's 1-bit Adam (OnebitAdam). Steps 1..freeze_step: Adam on the all-reduced gradients,
// without bias correction, weight decay decoupled. After that the variance is frozen, gradients
// stay local (local_gradients()), and each step the momentum is updated from this rank's gradient
// and averaged over the ranks by the momentum reducer (the error-compensated 1-bit all-reduce,
// comm/compressed.h), which leaves the same momentum on every rank; the update divides it by the
// frozen variance.
class OneBitAdam : public WithMoments {
 public:
  OneBitAdam(int64_t freeze_step, int64_t n, at::Device device) : WithMoments(n, device), freeze_step_(freeze_step) {}

  bool local_gradients() const override { return step_ >= freeze_step_; }

  void update(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) override {
    if (step_ <= freeze_step_) {
      for (const ParamGroup& g : groups) {
        if (g.end == g.begin) continue;
        at::Tensor p = params.slice(0, g.begin, g.end);
        at::Tensor grad = grads.slice(0, g.begin, g.end).contiguous();
        at::Tensor m = exp_avg_.slice(0, g.begin, g.end);
        at::Tensor v = exp_avg_sq_.slice(0, g.begin, g.end);
        if (p.device().is_cpu()) {
          cpu_adam_step(p, grad, m, v, {g.lr, g.betas[0], g.betas[1], g.eps, g.weight_decay, true, false, step_},
                        nullptr);
          continue;
        }
        if (g.weight_decay != 0.0) p.mul_(1.0 - g.lr * g.weight_decay);
        m.mul_(g.betas[0]).add_(grad, 1.0 - g.betas[0]);
        v.mul_(g.betas[1]).addcmul_(grad, grad, 1.0 - g.betas[1]);
        p.addcdiv_(m, v.sqrt().add_(g.eps), -g.lr);
      }
      return;
    }
    for (const ParamGroup& g : groups) {
      if (g.end == g.begin) continue;
      exp_avg_.slice(0, g.begin, g.end).mul_(g.betas[0]).add_(grads.slice(0, g.begin, g.end), 1.0 - g.betas[0]);
    }
    if (reduce_momentum_) reduce_momentum_(exp_avg_);
    for (const ParamGroup& g : groups) {
      if (g.end == g.begin) continue;
      at::Tensor p = params.slice(0, g.begin, g.end);
      if (g.weight_decay != 0.0) p.mul_(1.0 - g.lr * g.weight_decay);
      p.addcdiv_(exp_avg_.slice(0, g.begin, g.end), exp_avg_sq_.slice(0, g.begin, g.end).sqrt().add_(g.eps), -g.lr);
    }
  }

  const char* name() const override { return "OneBitAdam"; }

 private:
  int64_t freeze_step_;
};

// Adagrad as torch.optim.Adagrad (lr_decay, L2 weight decay, initial accumulator value).
class Adagrad : public Optimizer {
 public:
  Adagrad(double lr_decay, double initial_accumulator_value, int64_t n, at::Device device)
      : lr_decay_(lr_decay),
        sum_(at::full({n}, initial_accumulator_value, at::TensorOptions().dtype(at::kFloat).device(device))) {}

  void update(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) override {
    for (const ParamGroup& g : groups) {
      if (g.end == g.begin) continue;
      at::Tensor p = params.slice(0, g.begin, g.end);
      at::Tensor grad = grads.slice(0, g.begin, g.end);
      at::Tensor sum = sum_.slice(0, g.begin, g.end);
      if (p.device().is_cpu()) {
        cpu_adagrad_step(p, grad.contiguous(), sum, g.lr, lr_decay_, g.weight_decay, g.eps, step_);
        continue;
      }
      if (g.weight_decay != 0.0) grad = grad.add(p, g.weight_decay);
      const double clr = g.lr / (1.0 + static_cast<double>(step_ - 1) * lr_decay_);
      sum.addcmul_(grad, grad, 1.0);
      p.addcdiv_(grad, sum.sqrt().add_(g.eps), -clr);
    }
  }

  const char* name() const override { return "Adagrad"; }
  std::vector<std::string> state_names() const override { return {"sum"}; }
  at::Tensor& state(const std::string& name) override {
    if (name == "sum") return sum_;
    throw CheckpointError("Adagrad has no state named '" + name + "'");
  }

 private:
  double lr_decay_;
  at::Tensor sum_;
};

}  // namespace

int64_t Optimizer::state_bytes() const {
  int64_t total = 0;
  for (const std::string& name : state_names()) total += const_cast<Optimizer*>(this)->state(name).nbytes();
  return total;
}

std::unique_ptr<Optimizer> make_optimizer(const OptimizerConfig& config, int64_t n, at::Device device,
                                          int64_t num_tensors) {
  switch (config.type) {
    case OptimizerType::kAdam:
      return std::make_unique<Adam>(config.adam_w_mode, config.bias_correction, n, device,
                                    config.adam_w_mode ? "Adam (decoupled weight decay)" : "Adam");
    case OptimizerType::kAdamW:
      return std::make_unique<Adam>(true, config.bias_correction, n, device, "AdamW");
    case OptimizerType::kSgd:
      return std::make_unique<Sgd>(config.dampening, config.nesterov, n, device);
    case OptimizerType::kLamb:
      return std::make_unique<Lamb>(config.bias_correction, config.min_coeff, config.max_coeff, n, num_tensors, device);
    case OptimizerType::kAdagrad:
      return std::make_unique<Adagrad>(config.lr_decay, config.initial_accumulator_value, n, device);
    case OptimizerType::kOneBitAdam:
      return std::make_unique<OneBitAdam>(config.freeze_step, n, device);
  }
  ZEAL_INTERNAL_ASSERT(false, "unhandled optimizer type");
  return nullptr;
}

}  // namespace zeal::optim
