// Optimizers over flat fp32 buffers, stepped one segment (a contiguous range of the flat buffer) at
// a time: one segment per parameter group's owned range, or one per parameter's owned piece for an
// optimizer that works per tensor (LAMB's trust ratio). CPU buffers run the vectorised kernels of
// kernels/cpu (through optim/cpu_optim.h), CUDA buffers the fused kernels of kernels/cuda in a CUDA
// build (Adam, LAMB) or ATen ops (SGD, Adagrad).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/core/config.h"

namespace zeal::optim {

struct ParamGroup {
  int64_t begin = 0;  // element range [begin, end) of the flat buffers
  int64_t end = 0;
  double lr = 1e-3;
  double weight_decay = 0.0;
  std::array<double, 2> betas{0.9, 0.999};
  double eps = 1e-8;
  double momentum = 0.0;
  int64_t tensor = -1;  // per-tensor optimizers: the parameter this segment is (a piece of)
  // Flat-buffer coordinates, for the optimizers that keep state over the whole flat buffer on every
  // rank (1-bit Adam past its freeze step under ZeRO stage 1; see Note [Replicated momentum]):
  // [flat_begin, flat_end) is the flat range this segment covers, and begin/end its owned part in
  // local coordinates (begin == end where this rank owns none of it). -1: not given.
  int64_t flat_begin = -1;
  int64_t flat_end = -1;
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // One update of `params` (flat fp32) from `grads` (flat fp32, already unscaled and clipped).
  void step(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) {
    begin_step();
    update(params, grads, groups);
  }
  // The same in pieces, for a caller that holds the elements a sub-group at a time (NVMe offload):
  // begin_step() once, then update() on each piece, with state(name) rebound to that piece's
  // state and the groups in the piece's coordinates.
  void begin_step() { ++step_; }
  virtual void update(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) = 0;
  virtual const char* name() const = 0;
  int64_t steps_taken() const { return step_; }
  void set_steps_taken(int64_t steps) { step_ = steps; }  // restoring a checkpoint

  // Named per-element state, each flat fp32 over the same elements as the parameters (checkpoints):
  // the names that currently hold state, and access by name (allocated, zero, on first access).
  virtual std::vector<std::string> state_names() const = 0;
  virtual at::Tensor& state(const std::string& name) = 0;
  int64_t state_bytes() const;

  // Per-tensor optimizers want one segment per parameter piece (ParamGroup::tensor set) and, when
  // a tensor's pieces live on several ranks, a way to sum per-tensor statistics across them: the
  // reducer sums a float64 tensor over the data-parallel ranks in place. Every rank calls it
  // once per step, in step().
  virtual bool per_tensor() const { return false; }

  // The model-dtype (fp16 / bf16) copy of the updated parameters, written in the same pass as the
  // update where the kernel can (Adam on the CPU: ZeRO-Offload's host master weights), so the
  // caller skips a cast pass. `copy` spans the same elements as the parameters; after step(),
  // writes_model_copy() says whether it holds the new values.
  void set_model_copy(at::Tensor copy) { model_copy_ = std::move(copy); }
  virtual bool writes_model_copy() const { return false; }
  using SumReducer = std::function<void(at::Tensor&)>;
  void set_sum_reducer(SumReducer reducer) { reduce_sums_ = std::move(reducer); }
  // The same with a maximum in place of the sum (1-bit LAMB's per-parameter factor).
  void set_max_reducer(SumReducer reducer) { reduce_max_ = std::move(reducer); }

  // Compressed-communication optimizers (1-bit Adam, 0/1 Adam, 1-bit LAMB).
  // local_gradients(): whether the coming step wants this rank's own, unreduced gradients (the
  // engine then skips the gradient all-reduce). The engine hands them the error-compensated 1-bit
  // averaging over the ranks (comm/compressed.h), in place, and a way to zero its error buffers.
  virtual bool local_gradients() const { return false; }
  void set_compressed_averager(SumReducer average, std::function<void()> reset_errors) {
    average_ = std::move(average);
    reset_errors_ = std::move(reset_errors);
  }
  // Rounds of gradient or momentum communication the method skipped (0/1 Adam's local steps).
  int64_t skipped_rounds() const { return skipped_rounds_; }

  // ZeRO stage 1 with replicated state (Note [Replicated momentum]): wants_flat_segments() says the
  // coming step takes this rank's whole flat fp32 gradient and segments in flat coordinates
  // (ParamGroup::flat_begin); the gatherer turns a local (owned-elements) tensor into the whole
  // flat one, every rank's owned values in place.
  virtual bool wants_flat_segments() const { return false; }
  using Gatherer = std::function<at::Tensor(const at::Tensor&)>;
  void set_gatherer(Gatherer gather) { gather_ = std::move(gather); }

  // Scalar state beyond the per-element tensors (interval counters, per-tensor coefficients),
  // saved in checkpoints beside them; restore_scalars() takes what scalars() gave.
  virtual std::map<std::string, std::vector<double>> scalars() const { return {}; }
  virtual void restore_scalars(const std::map<std::string, std::vector<double>>& /*saved*/) {}
  // A checkpoint was loaded into params (local, fp32) and state(): drop what derives from them.
  virtual void state_loaded(const at::Tensor& /*params*/) {}

 protected:
  SumReducer reduce_sums_;
  SumReducer reduce_max_;
  SumReducer average_;
  std::function<void()> reset_errors_;
  Gatherer gather_;
  int64_t skipped_rounds_ = 0;
  at::Tensor model_copy_;
  int64_t step_ = 0;  // optimizer steps taken
};

// Builds the optimizer a config asks for, its state on `device`.
// num_tensors: how many parameters the segments may name (per-tensor optimizers); partitioned:
// whether the elements are this rank's ZeRO partition (stage >= 1).
std::unique_ptr<Optimizer> make_optimizer(const OptimizerConfig& config, int64_t num_elements,
                                          at::Device device = at::kCPU, int64_t num_tensors = 0,
                                          bool partitioned = false);

}  // namespace zeal::optim
