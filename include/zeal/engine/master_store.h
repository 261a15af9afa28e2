// Note [Master store]: where one unit's fp32 master weights and optimizer state live, and how the
// step reaches them. Three places, chosen by zero_optimization.offload_optimizer:
//   device (no offload): the master weights beside the model, the optimizer's kernels on the device;
//   host ("cpu"): master weights and state in (pinned) host memory, the step on the CPU kernels,
//     gradients staged on the host bucket by bucket as the reduction finishes them, and with
//     fp16 / bf16 a model-dtype copy the optimizer writes beside the fp32 values (half the bytes
//     back to the device);
//   NVMe ("nvme"): master weights and state in swap files (offload/optimizer_swapper.h), the step
//     visiting them a sub-group at a time; a checkpoint materialises them in host memory for the
//     length of the save or load.
// The store knows buffers in local (owned) coordinates only; the unit maps them to parameters.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/core/config.h"
#include "zeal/offload/optimizer_swapper.h"
#include "zeal/optim/optimizer.h"

namespace zeal::engine {

class MasterStore {
 public:
  MasterStore(const Config& config, at::ScalarType model_dtype, at::Device device);

  bool nvme() const { return nvme_; }
  bool offload() const { return offload_; }
  // Not NVMe: the initial master weights (fp32, owned coordinates; at stage 0 in fp32 the model's
  // own flat buffer), moved to host memory with offload.
  void place(const at::Tensor& initial);
  // Ties the optimizer to the store: with NVMe, the swap files start as `read_model(begin, end)`
  // (fp32) and the optimizer's initial state; with host offload in fp16 / bf16, the optimizer
  // writes the model-dtype copy.
  void bind(optim::Optimizer& optimizer, int64_t shard,
            const std::function<at::Tensor(int64_t, int64_t)>& read_model);

  // The fp32 master weights (undefined while NVMe keeps them on disk).
  at::Tensor& master() { return master_; }
  const at::Tensor& master() const { return master_; }
  offload::OptimizerSwapper* swapper() const { return swapper_.get(); }
  std::string location() const { return swapper_ ? "nvme" : master_.device().str(); }

  // Gradient staging (host offload): whether the step needs gradients on the host, a bucket's
  // owned values copied there as the reduction finishes them (non-blocking from a device), and
  // the step's gradients in fp32: the staged ones when all `num_buckets` arrived, else `local()`
  // (this rank's gradients where the reduction left them) copied over.
  bool stages_gradients() const { return host_grads_options_.has_value(); }
  void begin_backward() { staged_buckets_ = 0; }
  void stage(int64_t shard, int64_t local_begin, const at::Tensor& values);
  void bucket_staged() { ++staged_buckets_; }
  at::Tensor step_gradients(const std::function<at::Tensor()>& local, size_t num_buckets);

  // One optimizer step on the master weights. Returns what to publish to the model (the fp32
  // master or the model-dtype copy); with NVMe each sub-group's result goes through `write`
  // (owned coordinates) as it is done, and the result is undefined (the caller gathers).
  at::Tensor step(optim::Optimizer& optimizer, const at::Tensor& grads, const std::vector<optim::ParamGroup>& segments,
                  const std::function<void(int64_t, const at::Tensor&)>& write);
  // NVMe: master weights and state in host memory (checkpoints), and back to the files.
  void materialize(optim::Optimizer& optimizer);
  void release(optim::Optimizer& optimizer, bool write_back);
  // NVMe: owned elements [lo, lo + chunk.numel()) of the master take new values (zero.Init's
  // GatheredParameters modified a parameter).
  void patch(int64_t lo, const at::Tensor& chunk);

  // Bytes by role: host_grads, model copy (params), master (unless it is the model's buffer), and
  // the optimizer's state (NVMe: the host buffers only).
  int64_t grad_bytes() const;
  int64_t model_copy_bytes() const;
  int64_t master_bytes(const at::Tensor& model_flat) const;
  int64_t optimizer_bytes(const optim::Optimizer& optimizer) const;

 private:
  const Config& config_;
  at::ScalarType model_dtype_;
  at::Device device_;
  bool offload_ = false, nvme_ = false;
  at::TensorOptions host_;  // fp32 host memory, pinned when the config asks and the model is on a device
  std::optional<at::TensorOptions> host_grads_options_;
  at::Tensor master_;
  at::Tensor host_grads_;       // this rank's gradients staged in host memory for the step
  at::Tensor host_model_copy_;  // fp16 / bf16 with host offload: the step's model-dtype output
  int64_t staged_buckets_ = 0;  // buckets staged in this boundary's backward
  std::unique_ptr<offload::OptimizerSwapper> swapper_;
};

}  // namespace zeal::engine
