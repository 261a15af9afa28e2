// Optimizers over flat fp32 buffers. Parameters of one group occupy one contiguous range of the
// flat buffer, so an update is a handful of vectorized ATen ops per group (reference
// implementations; the SIMD and fused CUDA kernels come later behind the same interface).
#pragma once

#include <array>
#include <cstdint>
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
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // One update of `params` (flat fp32) from `grads` (flat fp32, already unscaled and clipped).
  virtual void step(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) = 0;
  virtual const char* name() const = 0;
  virtual int64_t steps_taken() const = 0;
  virtual void set_steps_taken(int64_t steps) = 0;  // restoring a checkpoint

  // Named per-element state, each flat fp32 over the same elements as the parameters (checkpoints):
  // the names that currently hold state, and access by name (allocated, zero, on first access).
  virtual std::vector<std::string> state_names() const = 0;
  virtual at::Tensor& state(const std::string& name) = 0;
  int64_t state_bytes() const;
};

// Builds the optimizer a config asks for, its state on `device`.
std::unique_ptr<Optimizer> make_optimizer(const OptimizerConfig& config, int64_t num_elements,
                                          at::Device device = at::kCPU);

}  // namespace zeal::optim
