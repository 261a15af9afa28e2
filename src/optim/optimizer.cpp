#include "zeal/optim/optimizer.h"

#include <algorithm>
#include <cmath>

#include <ATen/TensorOperators.h>
#include <ATen/ops/add.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/zeros.h>

#include "zeal/core/error.h"
#include "zeal/core/logging.h"
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

// The flat range a segment's replicated state covers (ParamGroup::flat_begin), its local range
// where none is given (below stage 1 the two coordinates agree).
std::pair<int64_t, int64_t> flat_range(const ParamGroup& g) {
  return g.flat_begin >= 0 ? std::pair{g.flat_begin, g.flat_end} : std::pair{g.begin, g.end};
}

// p <- p - lr (m / (sqrt(v) + eps) + weight_decay p): the update the compressed optimizers share
// (DeepSpeed's: no bias correction, weight decay decoupled).
void apply_frozen_adam(at::Tensor& p, const at::Tensor& m, const at::Tensor& v, const ParamGroup& g) {
  if (g.weight_decay != 0.0) p.mul_(1.0 - g.lr * g.weight_decay);
  p.addcdiv_(m, v.sqrt().add_(g.eps), -g.lr);
}

// Note [Replicated momentum]
// Past its freeze step 1-bit Adam averages the ranks' momenta, m_r = beta1 m + (1 - beta1) g_r, with
// the compressed all-reduce, which needs every rank's whole m_r. Under ZeRO stage 1 the optimizer
// state is partitioned; so at the first compressed step every rank gathers the whole momentum once,
// in full precision, and from then on keeps it whole. The compressed average leaves the same
// momentum on every rank, so the copies stay identical with no further gathers. The variance and
// the master weights stay partitioned: each rank updates its owned elements and the engine
// all-gathers the parameters as at any stage-1 step. The compressed all-reduce sees the same flat
// tensor as it does below stage 1, so stages 0 and 1 give the same results. After each step the
// owned part is copied into the partitioned exp_avg (what checkpoints save); a checkpoint load
// drops the whole copy, and the next compressed step gathers it again.

// DeepSpeed's 1-bit Adam (OnebitAdam). Steps 1..freeze_step: Adam on the all-reduced gradients,
// without bias correction, weight decay decoupled. After that the variance is frozen, gradients
// stay local (local_gradients()), and each step the momentum is updated from this rank's gradient
// and averaged over the ranks by the compressed averager (the error-compensated 1-bit all-reduce,
// comm/compressed.h), which leaves the same momentum on every rank; the update divides it by the
// frozen variance.
// The momentum of the compressed optimizers past their freeze step: exp_avg itself below stage 1,
// at stage 1 a whole replicated copy, gathered on first use (Note [Replicated momentum]).
class WithReplicatedMomentum : public WithMoments {
 public:
  WithReplicatedMomentum(int64_t n, at::Device device, bool partitioned)
      : WithMoments(n, device), partitioned_(partitioned) {}
  void state_loaded(const at::Tensor&) override { whole_momentum_ = at::Tensor(); }

 protected:
  at::Tensor whole_momentum() {
    if (!partitioned_) return exp_avg_;
    if (!whole_momentum_.defined()) {
      ZEAL_INTERNAL_ASSERT(gather_, name(), " at ZeRO stage 1 without a gatherer");
      whole_momentum_ = gather_(exp_avg_);
    }
    return whole_momentum_;
  }
  bool partitioned_;

 private:
  at::Tensor whole_momentum_;
};

class OneBitAdam : public WithReplicatedMomentum {
 public:
  OneBitAdam(int64_t freeze_step, int64_t n, at::Device device, bool partitioned)
      : WithReplicatedMomentum(n, device, partitioned), freeze_step_(freeze_step) {}

  bool local_gradients() const override { return step_ >= freeze_step_; }
  bool wants_flat_segments() const override { return partitioned_ && local_gradients(); }

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
        m.mul_(g.betas[0]).add_(grad, 1.0 - g.betas[0]);
        v.mul_(g.betas[1]).addcmul_(grad, grad, 1.0 - g.betas[1]);
        apply_frozen_adam(p, m, v, g);
      }
      if (step_ == freeze_step_)
        log("optim", LogLevel::kInfo, "OneBitAdam: variance frozen after ", step_,
            " steps; from now on the momentum travels as 1-bit compressed all-reduce");
      return;
    }
    at::Tensor m = whole_momentum();
    for (const ParamGroup& g : groups) {
      auto [fb, fe] = flat_range(g);
      if (fe > fb) m.slice(0, fb, fe).mul_(g.betas[0]).add_(grads.slice(0, fb, fe), 1.0 - g.betas[0]);
    }
    if (average_) average_(m);
    for (const ParamGroup& g : groups) {
      if (g.end == g.begin) continue;
      auto [fb, fe] = flat_range(g);
      at::Tensor p = params.slice(0, g.begin, g.end);
      apply_frozen_adam(p, m.slice(0, fb, fe), exp_avg_sq_.slice(0, g.begin, g.end), g);
      if (partitioned_) exp_avg_.slice(0, g.begin, g.end).copy_(m.slice(0, fb, fe));
    }
  }

  const char* name() const override { return "OneBitAdam"; }

 private:
  int64_t freeze_step_;
};

// DeepSpeed's 0/1 Adam (ZeroOneAdam, arXiv:2202.06009), with its parameter names and policies.
// Phase 1 (steps 1..var_freeze_step): the variance is updated only on steps that are multiples of
// var_interval, from gradients all-reduced in full precision; on the others the gradients stay
// local and are averaged by the compressed all-reduce, and only the momentum moves. var_interval
// starts at 1 and doubles after every var_update_scaler variance updates.
// Phase 2: the variance is frozen and each rank takes local steps with its own gradients; every
// local_step_interval steps the ranks synchronise: the distance each rank's parameters moved since
// the last synchronisation, scaled by sqrt(v) + eps, is averaged compressed, the momentum is
// rebuilt from it and the parameters are set to the anchor plus the averaged move. The interval
// starts at 1 and doubles (up to local_step_clipper) every local_step_scaler steps.
// Unlike DeepSpeed, which accumulates the updates in a buffer and subtracts them again, Zeal keeps
// the anchor (the parameters at the last synchronisation): after each synchronisation every rank
// holds bitwise the same parameters, so replicas never drift apart by rounding.
// Note [Weight decay outside the move]: DeepSpeed's accumulated updates include the weight decay,
// so the momentum it rebuilds from them carries wd * p * (sqrt(v) + eps) besides the momentum; the
// decay then reaches the parameters once directly and again, with 1 / (1 - beta1) weight, through
// the momentum (about ten times the configured decay with beta1 0.9). Zeal decays the anchor with
// the parameters, so the move, and the momentum rebuilt from it, hold the momentum's steps only.
class ZeroOneAdam : public WithMoments {
 public:
  ZeroOneAdam(const OptimizerConfig& c, int64_t n, at::Device device)
      : WithMoments(n, device),
        var_freeze_step_(c.var_freeze_step),
        var_update_scaler_(c.var_update_scaler),
        local_step_scaler_(c.local_step_scaler),
        local_step_clipper_(c.local_step_clipper) {}

  bool local_gradients() const override { return frozen_ || (step_ + 1) % var_interval_ != 0; }

  void update(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) override {
    if (!frozen_)
      variance_phase(params, grads, groups);
    else
      local_step_phase(params, grads, groups);
  }

  const char* name() const override { return "ZeroOneAdam"; }

  std::map<std::string, std::vector<double>> scalars() const override {
    return {{"var_interval", {static_cast<double>(var_interval_)}},
            {"var_counter", {static_cast<double>(var_counter_)}},
            {"local_step_interval", {static_cast<double>(local_interval_)}},
            {"local_step_counter", {static_cast<double>(local_counter_)}},
            {"frozen", {frozen_ ? 1.0 : 0.0}}};
  }
  void restore_scalars(const std::map<std::string, std::vector<double>>& saved) override {
    auto get = [&](const char* key, int64_t fallback) {
      auto it = saved.find(key);
      return it == saved.end() || it->second.empty() ? fallback : static_cast<int64_t>(it->second[0]);
    };
    var_interval_ = get("var_interval", 1);
    var_counter_ = get("var_counter", 0);
    local_interval_ = get("local_step_interval", 1);
    local_counter_ = get("local_step_counter", 0);
    frozen_ = get("frozen", 0) != 0;
  }
  // A load is a synchronisation point: every rank restarts from the saved parameters (rank 0's)
  // with nothing accumulated since.
  void state_loaded(const at::Tensor& params) override {
    anchor_ = frozen_ ? params.clone() : at::Tensor();
    lrs_.clear();
  }

 private:
  void variance_phase(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) {
    const bool variance_step = step_ % var_interval_ == 0;
    at::Tensor g = grads;
    if (!variance_step && average_) average_(g);  // the engine's fp32 gradient buffer, averaged in place
    for (const ParamGroup& s : groups) {
      if (s.end == s.begin) continue;
      at::Tensor grad = g.slice(0, s.begin, s.end);
      at::Tensor m = exp_avg_.slice(0, s.begin, s.end);
      at::Tensor v = exp_avg_sq_.slice(0, s.begin, s.end);
      m.mul_(s.betas[0]).add_(grad, 1.0 - s.betas[0]);
      if (variance_step) v.mul_(s.betas[1]).addcmul_(grad, grad, 1.0 - s.betas[1]);
      at::Tensor p = params.slice(0, s.begin, s.end);
      apply_frozen_adam(p, m, v, s);
    }
    if (variance_step && ++var_counter_ == var_update_scaler_) {
      var_counter_ = 0;
      var_interval_ *= 2;
    }
    if (step_ >= var_freeze_step_) {
      frozen_ = true;
      if (reset_errors_) reset_errors_();  // the errors will be of parameter moves, not gradients
      anchor_ = params.clone();
      log("optim", LogLevel::kInfo, "ZeroOneAdam: variance frozen after ", step_,
          " steps; from now on local steps, synchronised by 1-bit compressed all-reduce");
    }
  }

  void local_step_phase(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) {
    if (!anchor_.defined()) anchor_ = params.clone();
    if (lrs_.size() != groups.size()) lrs_.assign(groups.size(), 0.0);
    for (size_t k = 0; k < groups.size(); ++k) {
      const ParamGroup& s = groups[k];
      if (s.end == s.begin) continue;
      at::Tensor m = exp_avg_.slice(0, s.begin, s.end);
      m.mul_(s.betas[0]).add_(grads.slice(0, s.begin, s.end), 1.0 - s.betas[0]);
      at::Tensor p = params.slice(0, s.begin, s.end);
      apply_frozen_adam(p, m, exp_avg_sq_.slice(0, s.begin, s.end), s);
      // Note [Weight decay outside the move]: the anchor decays with the parameters, so the move
      // holds the momentum's steps only.
      if (s.weight_decay != 0.0) anchor_.slice(0, s.begin, s.end).mul_(1.0 - s.lr * s.weight_decay);
      lrs_[k] += s.lr;
    }
    if (step_ % local_interval_ == 0) {
      // The move since the anchor, in momentum units (times sqrt(v) + eps), averaged over the ranks.
      at::Tensor move = params - anchor_;
      std::vector<at::Tensor> denoms(groups.size());
      for (size_t k = 0; k < groups.size(); ++k) {
        const ParamGroup& s = groups[k];
        if (s.end == s.begin) continue;
        denoms[k] = exp_avg_sq_.slice(0, s.begin, s.end).sqrt().add_(s.eps);
        move.slice(0, s.begin, s.end).mul_(denoms[k]);
      }
      if (average_) average_(move);
      for (size_t k = 0; k < groups.size(); ++k) {
        const ParamGroup& s = groups[k];
        if (s.end == s.begin) continue;
        at::Tensor mv = move.slice(0, s.begin, s.end);
        if (lrs_[k] != 0.0) exp_avg_.slice(0, s.begin, s.end).copy_(mv).div_(-lrs_[k]);
        at::Tensor p = params.slice(0, s.begin, s.end);
        at::add_out(p, anchor_.slice(0, s.begin, s.end), mv.div_(denoms[k]));
        lrs_[k] = 0.0;
      }
      anchor_.copy_(params);
    } else {
      ++skipped_rounds_;
    }
    if (++local_counter_ == local_step_scaler_) {
      local_counter_ = 0;
      local_interval_ = std::min(local_step_clipper_, 2 * local_interval_);
    }
  }

  int64_t var_freeze_step_, var_update_scaler_, local_step_scaler_, local_step_clipper_;
  int64_t var_interval_ = 1, var_counter_ = 0;
  int64_t local_interval_ = 1, local_counter_ = 0;
  bool frozen_ = false;
  at::Tensor anchor_;        // phase 2: the parameters at the last synchronisation
  std::vector<double> lrs_;  // phase 2: per segment, the sum of the learning rates since then
};

// DeepSpeed's 1-bit LAMB (OnebitLamb, arXiv:2104.06069), with its parameter names. Steps
// 1..freeze_step: LAMB (no bias correction) on all-reduced gradients, each parameter's
// coefficient ||p|| / ||update|| clamped to [min_coeff, max_coeff], and a running average of that
// coefficient (coeff_beta) kept per parameter. At freeze_step the variance is frozen and copied to
// a "fresh" variance. After it: the momentum, scaled per parameter so that every parameter's
// momentum has the same RMS (scaling fixed at the first compressed step), is averaged compressed;
// the fresh variance follows the gradients reconstructed from the averaged momentum, and each
// parameter's coefficient is its frozen average times a factor, max((sqrt(v) + eps) /
// (sqrt(v_fresh) + eps)), clamped to [factor_min, factor_max] and to within factor_threshold of
// the previous step's factor.
// Segments are parameter pieces. Under ZeRO stage 1 a parameter's pieces sit on several ranks: its
// sums of squares are added (the sum reducer) and its factor's maximum taken (the max reducer)
// across them, and every rank computes every parameter's scalars from the reduced values, so the
// scalars agree everywhere. Past the freeze the momentum is replicated (Note [Replicated momentum]).
class OneBitLamb : public WithReplicatedMomentum {
 public:
  OneBitLamb(const OptimizerConfig& c, int64_t n, int64_t num_tensors, at::Device device, bool partitioned)
      : WithReplicatedMomentum(n, device, partitioned),
        freeze_step_(c.freeze_step),
        min_coeff_(c.min_coeff),
        max_coeff_(c.max_coeff),
        coeff_beta_(c.coeff_beta),
        factor_max_(c.factor_max),
        factor_min_(c.factor_min),
        factor_threshold_(c.factor_threshold),
        exp_avg_sq_fresh_(at::zeros({n}, exp_avg_.options())),
        coeff_freeze_(num_tensors, 0.0),
        last_factor_(num_tensors, 1.0) {}

  bool per_tensor() const override { return true; }
  bool local_gradients() const override { return step_ >= freeze_step_; }
  bool wants_flat_segments() const override { return partitioned_ && local_gradients(); }
  const char* name() const override { return "OneBitLamb"; }

  std::vector<std::string> state_names() const override { return {"exp_avg", "exp_avg_sq", "exp_avg_sq_fresh"}; }
  at::Tensor& state(const std::string& name) override {
    if (name == "exp_avg_sq_fresh") return exp_avg_sq_fresh_;
    return WithMoments::state(name);
  }
  std::map<std::string, std::vector<double>> scalars() const override {
    return {{"lamb_coeff_freeze", coeff_freeze_}, {"last_factor", last_factor_}, {"scaling_coeff", scaling_}};
  }
  void restore_scalars(const std::map<std::string, std::vector<double>>& saved) override {
    auto get = [&](const char* key, std::vector<double>& into) {
      auto it = saved.find(key);
      if (it == saved.end()) return;
      ZEAL_CHECK_AS(CheckpointError, it->second.empty() || it->second.size() == into.size(), "OneBitLamb: the checkpoint's ",
                    key, " has ", it->second.size(), " entries, the model ", into.size(), " parameters");
      if (!it->second.empty()) into = it->second;
    };
    get("lamb_coeff_freeze", coeff_freeze_);
    get("last_factor", last_factor_);
    auto it = saved.find("scaling_coeff");
    scaling_ = it == saved.end() ? std::vector<double>{} : it->second;
  }

  void update(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& segments) override {
    if (step_ <= freeze_step_)
      warmup(params, grads, segments);
    else
      compressed(params, grads, segments);
  }

 private:
  static double sum_sq(const at::Tensor& x) { return x.to(at::kDouble).pow(2).sum().item<double>(); }

  void warmup(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& segments) {
    const size_t num_tensors = coeff_freeze_.size();
    at::Tensor sums = at::zeros({2 * static_cast<int64_t>(num_tensors)}, at::TensorOptions().dtype(at::kDouble));
    std::vector<at::Tensor> updates(segments.size());
    for (size_t k = 0; k < segments.size(); ++k) {
      const ParamGroup& s = segments[k];
      if (s.end == s.begin) continue;
      at::Tensor p = params.slice(0, s.begin, s.end);
      at::Tensor grad = grads.slice(0, s.begin, s.end);
      at::Tensor m = exp_avg_.slice(0, s.begin, s.end);
      at::Tensor v = exp_avg_sq_.slice(0, s.begin, s.end);
      m.mul_(s.betas[0]).add_(grad, 1.0 - s.betas[0]);
      v.mul_(s.betas[1]).addcmul_(grad, grad, 1.0 - s.betas[1]);
      updates[k] = m / v.sqrt().add_(s.eps);
      if (s.weight_decay > 0.0) updates[k].add_(p, s.weight_decay);
      sums[2 * s.tensor] += sum_sq(p);
      sums[2 * s.tensor + 1] += sum_sq(updates[k]);
    }
    if (reduce_sums_) reduce_sums_(sums);
    std::vector<double> coeff(num_tensors, 1.0);
    const double* sq = sums.data_ptr<double>();
    for (size_t t = 0; t < num_tensors; ++t) {
      const double weight_norm = std::sqrt(sq[2 * t]), update_norm = std::sqrt(sq[2 * t + 1]);
      if (weight_norm != 0.0 && update_norm != 0.0) coeff[t] = std::clamp(weight_norm / update_norm, min_coeff_, max_coeff_);
      if (coeff[t] != 1.0) coeff_freeze_[t] = coeff_beta_ * coeff_freeze_[t] + (1.0 - coeff_beta_) * coeff[t];
    }
    for (size_t k = 0; k < segments.size(); ++k) {
      const ParamGroup& s = segments[k];
      if (s.end == s.begin) continue;
      params.slice(0, s.begin, s.end).add_(updates[k], -s.lr * coeff[s.tensor]);
    }
    if (step_ == freeze_step_) {
      exp_avg_sq_fresh_.copy_(exp_avg_sq_);
      log("optim", LogLevel::kInfo, "OneBitLamb: variance and coefficients frozen after ", step_,
          " steps; from now on the momentum travels as 1-bit compressed all-reduce");
    }
  }

  void compressed(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& segments) {
    at::Tensor m = whole_momentum();
    if (scaling_.empty()) momentum_scaling(m, segments);
    const at::Tensor last = m.clone();
    for (const ParamGroup& s : segments) {
      auto [fb, fe] = flat_range(s);
      if (fe > fb)
        m.slice(0, fb, fe).mul_(s.betas[0]).add_(grads.slice(0, fb, fe), 1.0 - s.betas[0]).mul_(scaling_[s.tensor]);
    }
    if (average_) average_(m);
    const size_t num_tensors = coeff_freeze_.size();
    at::Tensor sums = at::zeros({2 * static_cast<int64_t>(num_tensors)}, at::TensorOptions().dtype(at::kDouble));
    at::Tensor maxes = at::full({static_cast<int64_t>(num_tensors)}, -INFINITY, at::TensorOptions().dtype(at::kDouble));
    std::vector<at::Tensor> updates(segments.size());
    for (size_t k = 0; k < segments.size(); ++k) {
      const ParamGroup& s = segments[k];
      auto [fb, fe] = flat_range(s);
      if (fe == fb) continue;
      at::Tensor mk = m.slice(0, fb, fe).div_(scaling_[s.tensor]);
      if (s.end == s.begin) continue;  // another rank's piece: only its momentum is kept here
      const double b1 = s.betas[0], b2 = s.betas[1];
      at::Tensor p = params.slice(0, s.begin, s.end);
      at::Tensor fresh = exp_avg_sq_fresh_.slice(0, s.begin, s.end);
      at::Tensor grad = (mk - last.slice(0, fb, fe) * b1).div_(1.0 - b1);  // reconstructed
      fresh.mul_(b2).addcmul_(grad, grad, 1.0 - b2);
      at::Tensor denom = exp_avg_sq_.slice(0, s.begin, s.end).sqrt().add_(s.eps);
      at::Tensor prelim = mk / denom;
      updates[k] = s.weight_decay > 0.0 ? prelim + p * s.weight_decay : prelim;
      double& top = maxes.data_ptr<double>()[s.tensor];
      top = std::max(top, (denom / fresh.sqrt().add_(s.eps)).max().item<double>());
      sums[2 * s.tensor] += sum_sq(prelim);
      sums[2 * s.tensor + 1] += sum_sq(updates[k]);
      if (partitioned_) exp_avg_.slice(0, s.begin, s.end).copy_(mk);
    }
    if (reduce_sums_) reduce_sums_(sums);
    if (reduce_max_) reduce_max_(maxes);
    std::vector<double> factors(num_tensors, 1.0);
    const double* sq = sums.data_ptr<double>();
    const double* top = maxes.data_ptr<double>();
    std::vector<double> weight_decay(num_tensors, 0.0);
    for (const ParamGroup& s : segments) weight_decay[s.tensor] = s.weight_decay;
    for (size_t t = 0; t < num_tensors; ++t) {
      if (!std::isfinite(top[t])) continue;  // a parameter with no elements
      double factor = top[t];
      if (weight_decay[t] > 0.0) {
        const double ratio = std::min(1.0, std::sqrt(sq[2 * t]) / std::sqrt(sq[2 * t + 1]));
        factor = factor * ratio + (1.0 - ratio);
      }
      double& last_factor = last_factor_[t];
      factor = std::clamp(factor, factor_min_, factor_max_);
      factor = std::clamp(factor, last_factor * (1.0 - factor_threshold_), last_factor * (1.0 + factor_threshold_));
      last_factor = factor;
      factors[t] = factor;
    }
    for (size_t k = 0; k < segments.size(); ++k) {
      const ParamGroup& s = segments[k];
      if (s.end == s.begin) continue;
      params.slice(0, s.begin, s.end).add_(updates[k], -s.lr * coeff_freeze_[s.tensor] * factors[s.tensor]);
    }
  }

  // Per parameter, the factor that brings its momentum's RMS to the mean RMS over all parameters
  // (fixed once, at the first compressed step): one scale per compressed chunk then fits them all.
  // The momentum is whole here (below stage 1, or replicated), so no rank needs another's.
  void momentum_scaling(const at::Tensor& m, const std::vector<ParamGroup>& segments) {
    const size_t num_tensors = coeff_freeze_.size();
    std::vector<double> sq(num_tensors, 0.0), count(num_tensors, 0.0);
    for (const ParamGroup& s : segments) {
      auto [fb, fe] = flat_range(s);
      if (fe == fb) continue;
      sq[s.tensor] += sum_sq(m.slice(0, fb, fe));
      count[s.tensor] += static_cast<double>(fe - fb);
    }
    std::vector<double> rms(num_tensors, 0.0);
    double mean = 0.0;
    for (size_t t = 0; t < num_tensors; ++t) {
      rms[t] = count[t] > 0 ? std::sqrt(sq[t]) / std::sqrt(count[t]) : 0.0;
      mean += rms[t];
    }
    mean /= static_cast<double>(std::max<size_t>(1, num_tensors));
    scaling_.assign(num_tensors, 1.0);
    for (size_t t = 0; t < num_tensors; ++t)
      if (rms[t] > 0.0) scaling_[t] = mean / rms[t];
  }

  int64_t freeze_step_;
  double min_coeff_, max_coeff_, coeff_beta_, factor_max_, factor_min_, factor_threshold_;
  at::Tensor exp_avg_sq_fresh_;
  std::vector<double> coeff_freeze_;  // per parameter: the running average of the warmup coefficient
  std::vector<double> last_factor_;   // per parameter: the previous step's factor
  std::vector<double> scaling_;       // per parameter: the momentum scaling (empty until compression)
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
                                          int64_t num_tensors, bool partitioned) {
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
      return std::make_unique<OneBitAdam>(config.freeze_step, n, device, partitioned);
    case OptimizerType::kZeroOneAdam:
      return std::make_unique<ZeroOneAdam>(config, n, device);
    case OptimizerType::kOneBitLamb:
      return std::make_unique<OneBitLamb>(config, n, num_tensors, device, partitioned);
  }
  ZEAL_INTERNAL_ASSERT(false, "unhandled optimizer type");
  return nullptr;
}

}  // namespace zeal::optim
