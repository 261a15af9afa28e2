#include "zeal/engine/master_store.h"

#include <algorithm>

#include <ATen/ATen.h>

#include "zeal/core/logging.h"

namespace zeal::engine {

MasterStore::MasterStore(const Config& config, at::ScalarType model_dtype, at::Device device)
    : config_(config), model_dtype_(model_dtype), device_(device) {
  const OffloadOptimizerConfig& o = config.zero_optimization.offload_optimizer;
  offload_ = o.enabled;
  nvme_ = o.device == OffloadDevice::kNvme;
  host_ = at::TensorOptions().dtype(at::kFloat).device(at::kCPU).pinned_memory(offload_ && o.pin_memory &&
                                                                                 !device.is_cpu());
  // fp32 gradients on the host; a CPU model in fp32 already has them there. Allocated at the first
  // step: construction already holds the model's own weights beside the shard.
  if (offload_ && !(device.is_cpu() && model_dtype == at::kFloat)) host_grads_options_ = host_;
}

void MasterStore::place(const at::Tensor& initial) {
  if (!offload_) {
    master_ = initial;
    return;
  }
  master_ = at::empty({initial.numel()}, host_);
  master_.copy_(initial);
}

void MasterStore::bind(optim::Optimizer& optimizer, int64_t shard,
                       const std::function<at::Tensor(int64_t, int64_t)>& read_model) {
  if (!nvme_) {
    if (offload_ && model_dtype_ != at::kFloat) {
      host_model_copy_ = at::empty({master_.numel()}, host_.dtype(model_dtype_));
      host_model_copy_.copy_(master_);  // elements no segment covers (padding) keep their values
      optimizer.set_model_copy(host_model_copy_);
    }
    return;
  }
  if (config_.optimizer.type == OptimizerType::kSgd && config_.optimizer.momentum != 0.0)
    optimizer.state("momentum_buffer");  // allocated on first use otherwise, and so not yet named
  std::vector<std::string> names{"master"};
  for (const std::string& name : optimizer.state_names()) names.push_back(name);
  const OffloadOptimizerConfig& o = config_.zero_optimization.offload_optimizer;
  offload::NvmeSwapConfig swap;
  swap.nvme_path = o.nvme_path;
  swap.sub_group_size = config_.zero_optimization.sub_group_size;
  swap.buffer_count = o.buffer_count;
  swap.pipeline_read = o.pipeline_read;
  swap.pipeline_write = o.pipeline_write;
  swap.aio = config_.aio;
  swapper_ = std::make_unique<offload::OptimizerSwapper>(swap, shard, names);
  offload::OptimizerSwapper& swapper = *swapper_;
  // Every sub-group starts as the model's values (cast to fp32) and the optimizer's initial state,
  // which the optimizer built for one sub-group and is the same for every element.
  swapper.for_each(
      [&](int64_t k, std::vector<at::Tensor>& views) {
        views[0].copy_(read_model(swapper.begin(k), swapper.end(k)));
        for (size_t j = 1; j < views.size(); ++j)
          views[j].copy_(optimizer.state(names[j]).slice(0, 0, views[j].numel()));
      },
      /*read=*/false, /*write_back=*/true);
  // The step binds the state to the swap buffers; the optimizer's own allocation is not needed again.
  for (size_t j = 1; j < names.size(); ++j) optimizer.state(names[j]) = at::empty({0}, at::kFloat);
}

void MasterStore::stage(int64_t shard, int64_t local_begin, const at::Tensor& values) {
  if (!host_grads_.defined()) host_grads_ = at::empty({shard}, *host_grads_options_);
  const bool async = device_.is_cuda() && host_grads_.is_pinned();
  host_grads_.slice(0, local_begin, local_begin + values.numel()).copy_(values, async);
}

at::Tensor MasterStore::step_gradients(const std::function<at::Tensor()>& local, size_t num_buckets) {
  const int64_t staged = staged_buckets_;
  staged_buckets_ = 0;
  if (host_grads_options_ && staged == static_cast<int64_t>(num_buckets)) {
    log("engine", LogLevel::kDebug, "gradients staged on the host in ", staged, " buckets during backward");
    if (device_.is_cuda()) (void)at::zeros({1}, at::TensorOptions().device(device_)).item<float>();
    // (a blocking read on the same stream: the non-blocking bucket copies queued before it are done)
    return host_grads_;
  }
  const at::Tensor grads = local();
  if (host_grads_options_ && !grads.is_same(host_grads_)) {  // offload: to host fp32 in one copy
    if (!host_grads_.defined()) host_grads_ = at::empty({grads.numel()}, *host_grads_options_);
    host_grads_.copy_(grads);
    return host_grads_;
  }
  return grads.scalar_type() == at::kFloat ? grads : grads.to(at::kFloat);
}

at::Tensor MasterStore::step(optim::Optimizer& optimizer, const at::Tensor& grads,
                             const std::vector<optim::ParamGroup>& segments,
                             const std::function<void(int64_t, const at::Tensor&)>& write) {
  if (!swapper_) {
    optimizer.step(master_, grads, segments);
    return optimizer.writes_model_copy() ? host_model_copy_ : master_;
  }
  optimizer.begin_step();
  offload::OptimizerSwapper& swapper = *swapper_;
  const std::vector<std::string>& names = swapper.names();
  std::vector<optim::ParamGroup> local;
  swapper.for_each(
      [&](int64_t k, std::vector<at::Tensor>& views) {
        const int64_t b = swapper.begin(k), e = swapper.end(k);
        for (size_t j = 1; j < views.size(); ++j) optimizer.state(names[j]) = views[j];
        local.clear();  // the segments' pieces inside this sub-group, in its coordinates
        for (const optim::ParamGroup& segment : segments) {
          const int64_t lo = std::max(segment.begin, b), hi = std::min(segment.end, e);
          if (lo >= hi) continue;
          optim::ParamGroup piece = segment;
          piece.begin = lo - b;
          piece.end = hi - b;
          local.push_back(piece);
        }
        at::Tensor grads_k = grads.slice(0, b, e);
        optimizer.update(views[0], grads_k, local);
        write(b, views[0]);
      },
      /*read=*/true, /*write_back=*/true);
  return at::Tensor();
}

void MasterStore::materialize(optim::Optimizer& optimizer) {
  offload::OptimizerSwapper& swapper = *swapper_;
  const std::vector<std::string>& names = swapper.names();
  std::vector<at::Tensor> full;
  for (size_t j = 0; j < names.size(); ++j)
    full.push_back(at::empty({swapper.numel()}, at::TensorOptions().dtype(at::kFloat)));
  swapper.for_each(
      [&](int64_t k, std::vector<at::Tensor>& views) {
        for (size_t j = 0; j < names.size(); ++j) full[j].slice(0, swapper.begin(k), swapper.end(k)).copy_(views[j]);
      },
      /*read=*/true, /*write_back=*/false);
  master_ = full[0];
  for (size_t j = 1; j < names.size(); ++j) optimizer.state(names[j]) = full[j];
}

void MasterStore::release(optim::Optimizer& optimizer, bool write_back) {
  offload::OptimizerSwapper& swapper = *swapper_;
  const std::vector<std::string>& names = swapper.names();
  if (write_back) {
    swapper.for_each(
        [&](int64_t k, std::vector<at::Tensor>& views) {
          const int64_t b = swapper.begin(k), e = swapper.end(k);
          views[0].copy_(master_.slice(0, b, e));
          for (size_t j = 1; j < names.size(); ++j) views[j].copy_(optimizer.state(names[j]).slice(0, b, e));
        },
        /*read=*/false, /*write_back=*/true);
  }
  master_ = at::Tensor();
  for (size_t j = 1; j < names.size(); ++j) optimizer.state(names[j]) = at::empty({0}, at::kFloat);
}

void MasterStore::patch(int64_t lo, const at::Tensor& chunk) {
  const int64_t hi = lo + chunk.numel();
  if (!swapper_) {
    master_.slice(0, lo, hi).copy_(chunk);
    return;
  }
  // Every sub-group the range overlaps is read, patched, written.
  offload::OptimizerSwapper& swapper = *swapper_;
  swapper.for_each(
      [&](int64_t k, std::vector<at::Tensor>& views) {
        const int64_t b = std::max(lo, swapper.begin(k)), e = std::min(hi, swapper.end(k));
        if (b < e) views[0].slice(0, b - swapper.begin(k), e - swapper.begin(k)).copy_(chunk.slice(0, b - lo, e - lo));
      },
      /*read=*/true, /*write_back=*/true);
}

namespace {
int64_t bytes(const at::Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : int64_t{0}; }
}  // namespace

int64_t MasterStore::grad_bytes() const { return bytes(host_grads_); }
int64_t MasterStore::model_copy_bytes() const { return bytes(host_model_copy_); }
int64_t MasterStore::master_bytes(const at::Tensor& model_flat) const {
  return (master_.defined() && !master_.is_same(model_flat)) ? bytes(master_) : 0;
}
int64_t MasterStore::optimizer_bytes(const optim::Optimizer& optimizer) const {
  // NVMe offload: the host holds a few sub-groups of master weights and state, the rest is on disk.
  return swapper_ ? swapper_->host_buffer_bytes() : optimizer.state_bytes();
}

}  // namespace zeal::engine
