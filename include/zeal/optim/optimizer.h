// Optimizers over flat fp32 buffers, stepped one segment (a contiguous range of the flat buffer) at
// a time: one segment per parameter group's owned range, or one per parameter's owned piece for an
// optimizer that works per tensor (LAMB's trust ratio). CPU buffers run the vectorised kernels of
// kernels/cpu (through optim/cpu_optim.h), CUDA buffers the fused kernels of kernels/cuda in a CUDA
// build (Adam, LAMB) or ATen ops (SGD, Adagrad).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
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

  // Compressed-communication optimizers (1-bit Adam): whether the coming step wants this rank's
  // own, unreduced gradients (the engine then skips the gradient all-reduce), and the reducer that
  // averages the momentum over the ranks in place (the engine's compressed all-reduce).
  virtual bool local_gradients() const { return false; }
  void set_momentum_reducer(SumReducer reducer) { reduce_momentum_ = std::move(reducer); }

 protected:
  SumReducer reduce_sums_;
  SumReducer reduce_momentum_;
  at::Tensor model_copy_;
  int64_t step_ = 0;  // optimizer steps taken
};

// Builds the optimizer a config asks for, its state on `device`.
// num_tensors: how many parameters the segments may name (per-tensor optimizers).
std::unique_ptr<Optimizer> make_optimizer(const OptimizerConfig& config, int64_t num_elements,
                                          at::Device device = at::kCPU, int64_t num_tensors = 0);

}  // namespace zeal::optim
