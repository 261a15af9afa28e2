#include "zeal/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <unordered_set>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "zeal/comm/comms_logger.h"
#include "zeal/comm/compressed.h"
#include "zeal/core/error.h"
#include "zeal/core/logging.h"
#include "zeal/optim/cpu_optim.h"
#include "zeal/offload/optimizer_swapper.h"
#include "zeal/zero/segments.h"

namespace zeal::engine {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

at::ScalarType dtype_for(Precision p) {
  switch (p) {
    case Precision::kFp16: return at::kHalf;
    case Precision::kBf16: return at::kBFloat16;
    case Precision::kFp32: return at::kFloat;
  }
  return at::kFloat;
}

}  // namespace

Engine::Engine(std::vector<ParamGroupSpec> specs, Config config, comm::CommunicatorPtr world,
               std::unique_ptr<optim::Optimizer> client_optimizer)
    : Engine(std::move(specs), std::move(config),
             world ? std::make_shared<parallel::ProcessGroups>(parallel::Mesh({{"data", world->size()}}), world)
                   : nullptr,
             std::move(client_optimizer)) {}

Engine::Engine(std::vector<ParamGroupSpec> specs, Config config, std::shared_ptr<parallel::ProcessGroups> mesh,
               std::unique_ptr<optim::Optimizer> client_optimizer)
    : config_(std::move(config)), mesh_(std::move(mesh)) {
  ZEAL_CHECK_AS(ConfigError, mesh_, "the engine needs a communicator");
  // DeepSpeed's rule: the config's optimizer section or the optimizer passed to initialize, not both.
  ZEAL_CHECK_AS(ConfigError, !(config_.optimizer.present && client_optimizer),
                "config key 'optimizer': the config names an optimizer and initialize was also given one "
                "(optimizer=); keep one of them");
  ZEAL_CHECK_AS(ConfigError, config_.optimizer.present || client_optimizer,
                "config key 'optimizer': no optimizer to train with: add an 'optimizer' section (type Adam, AdamW, "
                "SGD, Lamb, Adagrad, OneBitAdam, ZeroOneAdam or OneBitLamb) or pass optimizer= to initialize "
                "(a torch.optim.Optimizer, or a callable that builds one from the parameters)");
  ZEAL_CHECK_AS(ConfigError,
                !client_optimizer || config_.zero_optimization.offload_optimizer.device != OffloadDevice::kNvme,
                "config key 'zero_optimization.offload_optimizer.device': \"nvme\" swaps the optimizer state in "
                "sub-groups, which a client optimizer (optimizer= in initialize) cannot do; use device \"cpu\" or a "
                "config 'optimizer' section");
  model_dtype_ = dtype_for(config_.precision());

  // Collect the trainable parameters group by group, skipping repeats (tied weights) and frozen ones.
  std::unordered_set<c10::TensorImpl*> seen;
  std::vector<size_t> group_of_param;
  std::vector<at::Tensor> given_chunks;  // zero::Init's chunks, parallel to params_
  std::vector<parallel::Placement> placements;  // parallel to params_
  for (size_t g = 0; g < specs.size(); ++g) {
    const ParamGroupSpec& spec = specs[g];
    for (size_t k = 0; k < spec.params.size(); ++k) {
      const at::Tensor& p = spec.params[k];
      ZEAL_CHECK(p.defined(), "parameter group ", g, " holds an undefined tensor");
      if (!p.requires_grad() || !seen.insert(p.unsafeGetTensorImpl()).second) continue;
      std::string name = k < spec.names.size() ? spec.names[k] : "group" + std::to_string(g) + "." + std::to_string(k);
      ZEAL_CHECK(p.is_leaf(), "parameter '", name, "' is not a leaf tensor; pass the model's parameters");
      if (params_.empty()) device_ = p.device();
      ZEAL_CHECK(p.device() == device_, "parameters on ", device_.str(), " and ", p.device().str(),
                 ": one engine trains the parameters of one device");
      ZEAL_CHECK(at::isFloatingType(p.scalar_type()), "parameter '", name, "' of dtype ",
                 c10::toString(p.scalar_type()), " cannot be trained");
      bool pre_partitioned = k < spec.chunks.size() && spec.chunks[k].defined();
      ZEAL_CHECK(!pre_partitioned || config_.zero_optimization.stage == 3, "parameter '", name,
                 "' was partitioned by zeal.zero.Init, which needs zero_optimization.stage 3 (config has stage ",
                 config_.zero_optimization.stage, ")");
      params_.push_back(p);
      names_.push_back(std::move(name));
      shapes_.push_back(pre_partitioned ? spec.full_shapes[k] : p.sizes().vec());
      splits_.push_back(k < spec.splits.size() ? spec.splits[k] : checkpoint::TensorSplit{});
      aliases_.push_back(k < spec.aliases.size() ? spec.aliases[k] : std::vector<std::string>{});
      given_chunks.push_back(pre_partitioned ? spec.chunks[k] : at::Tensor());
      group_of_param.push_back(g);
      placements.push_back(k < spec.placements.size() ? spec.placements[k] : parallel::Placement{});
    }
    const OptimizerConfig& o = config_.optimizer;
    optim::ParamGroup group;
    group.lr = specs[g].lr.value_or(o.lr);
    group.weight_decay = specs[g].weight_decay.value_or(o.weight_decay);
    group.betas = specs[g].betas.value_or(o.betas);
    group.eps = specs[g].eps.value_or(o.eps);
    group.momentum = o.momentum;
    groups_.push_back(group);
    base_lrs_.push_back(group.lr);
  }
  ZEAL_CHECK(!params_.empty(), "the model has no trainable parameters");
  derive_groups(placements);
  batch_ = config_.resolve_batch(world_->size());

  // The flat layout (zero/layout.h): reduction order, buckets padded to the data-parallel size.
  // Stage 3 gives every parameter a bucket of its own: the unit it is gathered and released in.
  std::vector<int64_t> numels;
  for (const auto& shape : shapes_) numels.push_back(c10::multiply_integers(shape));
  stage_ = config_.zero_optimization.stage;
  partitioned_ = stage_ >= 1;
  const bool reduce_scatter = stage_ == 3 || (stage_ == 2 && config_.zero_optimization.reduce_scatter);
  layout_ = zero::make_flat_layout(numels, stage_ == 3 ? 1 : config_.zero_optimization.reduce_bucket_size,
                                   world_->size());
  owned_ = layout_.owned(world_->rank(), partitioned_);
  const int64_t total = layout_.total;
  const int64_t shard = layout_.shard_size(partitioned_);
  auto options = at::TensorOptions().dtype(model_dtype_).device(device_);

  const OffloadOptimizerConfig& offload_config = config_.zero_optimization.offload_optimizer;
  const bool nvme = offload_config.device == OffloadDevice::kNvme;
  if (stage_ == 3) {
    init_stage3(given_chunks, options, /*with_master=*/!nvme);
  } else {
    // One flat buffer per role; the user's tensors become views of it (set_data keeps the same
    // tensor objects, so Python and C++ callers see the change). Padding stays zero.
    flat_params_ = at::zeros({total}, options);
    if (!reduce_scatter) flat_grads_ = at::zeros({total}, options);
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor& p = params_[i];
      int64_t n = p.numel(), offset = layout_.offsets[i];
      flat_params_.slice(0, offset, offset + n).copy_(p.detach().reshape({n}));
      p.set_data(flat_params_.slice(0, offset, offset + n).view(p.sizes()));
      if (flat_grads_.defined()) p.mutable_grad() = flat_grads_.slice(0, offset, offset + n).view(p.sizes());
    }
    // Every replica starts from rank 0's weights.
    if (world_->size() > 1) world_->broadcast(flat_params_, {0})->wait();
    // fp32 master weights and optimizer state cover this rank's owned elements only (all of them
    // below stage 1). NVMe offload keeps them in swap files instead (set up below).
    if (!nvme)
      master_ = partitioned_ ? gather_owned(flat_params_).to(at::kFloat)
                             : (model_dtype_ == at::kFloat ? flat_params_ : flat_params_.to(at::kFloat));
  }
  // ZeRO-Offload (zero_optimization.offload_optimizer): the fp32 master weights, the optimizer state
  // and a gradient staging buffer live in host memory and the step runs on the CPU kernels; with
  // device "nvme" the master weights and the state live in swap files (offload/optimizer_swapper.h)
  // and the step visits them a sub-group at a time.
  const bool offload = offload_config.enabled;
  const auto host = at::TensorOptions().dtype(at::kFloat).device(at::kCPU).pinned_memory(
      offload && offload_config.pin_memory && !device_.is_cpu());
  if (offload && master_.defined()) {
    at::Tensor on_host = at::empty({master_.numel()}, host);
    on_host.copy_(master_);
    master_ = on_host;
  }
  // fp32 gradients on the host; a CPU model in fp32 already has them there.
  // Allocated at the first step: construction already holds the model's own weights beside the shard.
  if (offload && !(device_.is_cpu() && model_dtype_ == at::kFloat)) host_grads_options_ = host;
  const int64_t sub_group = nvme ? std::max<int64_t>(1, std::min(config_.zero_optimization.sub_group_size, shard)) : shard;
  optimizer_ = client_optimizer ? std::move(client_optimizer)
                               : optim::make_optimizer(config_.optimizer, sub_group, offload ? at::Device(at::kCPU) : device_,
                                                       static_cast<int64_t>(params_.size()), partitioned_);
  if (nvme) {
    init_swap(shard);
  } else if (offload && model_dtype_ != at::kFloat) {
    // The step writes the fp16 / bf16 weights beside the fp32 ones where it can: half the bytes
    // to send back to the device, and no cast pass.
    host_model_copy_ = at::empty({master_.numel()}, host.dtype(model_dtype_));
    host_model_copy_.copy_(master_);  // elements no segment covers (padding) keep their values
    optimizer_->set_model_copy(host_model_copy_);
  }
  if (config_.optimizer.compressed() && world_->size() > 1)
    optimizer_->set_compressed_averager(
        [this](at::Tensor& values) { comm::compressed_all_reduce(*world_, values, onebit_state_); },
        [this] { onebit_state_.reset(); });
  if (partitioned_) optimizer_->set_gatherer([this](const at::Tensor& local) { return gather_whole(local); });
  // The optimizer's segments (zero/segments.h); with replicated optimizer state at stage 1 (Note
  // [Replicated momentum] in optim/optimizer.cpp) also in flat coordinates.
  zero::SegmentSpec segment_spec;
  segment_spec.layout = &layout_;
  segment_spec.owned = &owned_;
  segment_spec.groups = groups_;
  segment_spec.group_of_param = group_of_param;
  segment_spec.per_tensor = optimizer_->per_tensor();
  segment_spec.flat_state = partitioned_ && config_.optimizer.compressed();
  zero::Segments segments = zero::build_segments(segment_spec);
  segments_ = std::move(segments.local);
  segment_group_ = std::move(segments.group_of);
  flat_segments_ = std::move(segments.flat);
  flat_segment_group_ = std::move(segments.flat_group_of);
  if (optimizer_->per_tensor() && partitioned_ && world_->size() > 1) {
    // A parameter's pieces may sit on several ranks: the optimizer's per-tensor sums add across them.
    optimizer_->set_sum_reducer([this](at::Tensor& sums) { all_reduce_sum(sums); });
    optimizer_->set_max_reducer(
        [this](at::Tensor& values) { all_reduce_values(values, comm::ReduceOp::kMax, *world_); });
  }
  if (reduce_scatter) grad_shard_ = at::zeros({shard}, options);

  GradHooks hooks;
  if (stage_ == 3) {
    hooks.before_accumulate = [this](size_t i) { partition_->shape_only(i); };
    hooks.after_accumulate = [this](size_t i) { partition_->release(i); };
  }
  // The reducer creates the gradient accumulators, which record each parameter's shape: so it
  // comes before stage 3 releases the parameters.
  reducer_ = std::make_unique<GradReducer>(params_, layout_, flat_grads_, grad_shard_, world_, config_, hooks);
  if (host_grads_options_)
    reducer_->set_bucket_final([this](int64_t flat_begin, int64_t flat_end, int64_t shard_begin, int64_t shard_end) {
      stage_bucket_on_host(flat_begin, flat_end, shard_begin, shard_end);
    });
  if (stage_ == 3) {
    // offload_param: the shard in host memory, or in a swap file.
    const OffloadParamConfig& op = config_.zero_optimization.offload_param;
    zero::ParamPartition::Offload param_offload;
    param_offload.host_shard = op.device == OffloadDevice::kCpu;
    if (op.device == OffloadDevice::kNvme) param_offload.nvme_path = op.nvme_path;
    param_offload.aio = config_.aio;
    partition_ = std::make_unique<zero::ParamPartition>(params_, shapes_, layout_, stage3_shard_, world_,
                                                        config_.zero_optimization.param_persistence_threshold,
                                                        param_offload);
  }
  stage3_shard_.reset();
  if (config_.scheduler.present) schedule_ = optim::make_lr_schedule(config_.scheduler);
  precision_ = PrecisionPolicy(config_, stage_ >= 1);
  apply_lr(-1);

  int64_t n_params = 0;
  for (int64_t n : numels) n_params += n;
  log("engine", LogLevel::kInfo, n_params, " parameters in ", groups_.size(), " groups, ", reducer_->num_buckets(),
      " buckets; ZeRO stage ", stage_, "; precision ", c10::toString(model_dtype_), "; optimizer ", optimizer_->name(), "; batch ",
      batch_.train_batch_size, " = micro ", batch_.micro_batch_size, " x accumulation ",
      batch_.gradient_accumulation_steps, " x data-parallel ", world_->size());
  last_log_time_ = Clock::now();
}

Engine::~Engine() = default;

void Engine::derive_groups(const std::vector<parallel::Placement>& placements) {
  // Note [Parameter placement]: each parameter's reduction group and whether this rank counts it in
  // the norm follow from its tags. One engine holds one sharded-state unit today, so its parameters
  // must share a reduction group.
  const parallel::Mesh& mesh = mesh_->mesh();
  for (size_t i = 0; i < params_.size(); ++i) {
    std::vector<std::string> axes = parallel::reduction_axes(mesh, placements[i]);
    if (i == 0) reduction_axes_ = axes;
    ZEAL_CHECK(axes == reduction_axes_, "parameter '", names_[i], "' (", parallel::describe(placements[i]),
               ") reduces its gradient over ", mesh.key(axes), " and parameter '", names_[0], "' over ",
               mesh.key(reduction_axes_), ": one engine holds the parameters of one reduction group");
    if (!parallel::counts_in_norm(mesh, mesh_->rank(), placements[i])) uncounted_params_.push_back(i);
  }
  // Host parameters reduce over MPI, device ones over NCCL (Note [Backend by device]).
  world_ = mesh_->group_on(reduction_axes_, device_);
  if (config_.comms_logger.enabled) {
    const CommsLoggerConfig& c = config_.comms_logger;
    std::set<std::string> ops;
    if (!c.prof_all) ops.insert(c.prof_ops.begin(), c.prof_ops.end());
    world_ = std::make_shared<comm::CountingCommunicator>(world_, ops, c.verbose);
  }
  const comm::CommunicatorPtr& rest = mesh_->group(mesh.other_axes(reduction_axes_));
  if (rest->size() > 1) model_parallel_ = rest;
}

std::map<std::string, comm::OpCount> Engine::comms_counts() const {
  auto* counting = dynamic_cast<comm::CountingCommunicator*>(world_.get());
  return counting ? counting->counts() : std::map<std::string, comm::OpCount>{};
}

int64_t Engine::skipped_comm_rounds() const { return optimizer_->skipped_rounds(); }

void Engine::init_stage3(const std::vector<at::Tensor>& given_chunks, const at::TensorOptions& options,
                         bool with_master) {
  // This rank's chunk of every parameter, from zero::Init or cut from rank 0's full value.
  at::Tensor shard = at::zeros({layout_.shard_size(true)}, options);
  const int rank = world_->rank();
  int64_t local = 0;
  for (const zero::Bucket& b : layout_.buckets) {
    const int64_t c = b.chunk(world_->size());
    for (size_t i : b.params) {
      if (layout_.numels[i] == 0) continue;
      at::Tensor mine = shard.slice(0, local, local + c);
      if (given_chunks[i].defined()) {
        ZEAL_CHECK(given_chunks[i].numel() == c, "parameter '", names_[i], "' arrived with a chunk of ",
                   given_chunks[i].numel(), " elements; a data-parallel size of ", world_->size(), " needs ", c,
                   " (was zeal.zero.Init run with another world?)");
        mine.copy_(given_chunks[i].reshape({-1}));
        continue;
      }
      at::Tensor full = at::zeros({c * world_->size()}, options);
      full.slice(0, 0, layout_.numels[i]).copy_(params_[i].detach().reshape({-1}));
      if (world_->size() > 1) world_->broadcast(full, {0})->wait();
      mine.copy_(full.slice(0, rank * c, (rank + 1) * c));
    }
    local += c;
  }
  if (with_master) master_ = shard.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  stage3_shard_ = shard;
  // Parameters given whole still have their shape here, which the gradient accumulators record.
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].numel() != layout_.numels[i]) params_[i].set_data(at::empty(shapes_[i], options));
}

void Engine::absorb_parameter(size_t i) {
  ZEAL_CHECK(partition_, "absorb_parameter is for ZeRO stage 3");
  ZEAL_CHECK(i < params_.size(), "parameter index ", i, " out of range");
  if (!swapper_) {
    partition_->absorb(i, &master_);
    return;
  }
  // The swapped master takes the chunk too: every sub-group it overlaps is read, patched, written.
  partition_->absorb(i, nullptr);
  const int64_t lo = partition_->chunk_begin(i), hi = lo + partition_->chunk_size(i);
  const at::Tensor chunk = partition_->read_shard(lo, hi);
  swapper_->for_each(
      [&](int64_t k, std::vector<at::Tensor>& views) {
        const int64_t b = std::max(lo, swapper_->begin(k)), e = std::min(hi, swapper_->end(k));
        if (b < e) views[0].slice(0, b - swapper_->begin(k), e - swapper_->begin(k)).copy_(chunk.slice(0, b - lo, e - lo));
      },
      /*read=*/true, /*write_back=*/true);
}

std::vector<std::pair<std::string, int64_t>> Engine::state_bytes() const {
  auto bytes = [](const at::Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : int64_t{0}; };
  int64_t params = bytes(flat_params_) + bytes(host_model_copy_);
  int64_t grads = bytes(flat_grads_) + bytes(grad_shard_) + bytes(host_grads_);
  if (partition_) {
    params = bytes(partition_->shard()) + bytes(host_model_copy_);
    for (size_t i = 0; i < params_.size(); ++i)
      if (partition_->live(i)) params += bytes(partition_->full(i));
  }
  int64_t master = (master_.defined() && !master_.is_same(flat_params_)) ? bytes(master_) : 0;
  // NVMe offload: the host holds a few sub-groups of master weights and state, the rest is on disk.
  int64_t optimizer = swapper_ ? swapper_->host_buffer_bytes() : optimizer_->state_bytes();
  return {{"params", params}, {"grads", grads}, {"master", master}, {"optimizer", optimizer}};
}

bool Engine::is_gradient_accumulation_boundary() const {
  if (boundary_override_ >= 0) return boundary_override_ == 1;
  if (backwards_per_step_ > 0) return backwards_in_step_ == backwards_per_step_;
  return (micro_steps_ + 1) % batch_.gradient_accumulation_steps == 0;
}

bool Engine::next_backward_is_boundary() const {
  if (boundary_override_ < 0 && backwards_per_step_ > 0) return backwards_in_step_ + 1 == backwards_per_step_;
  return is_gradient_accumulation_boundary();
}

void Engine::set_backwards_per_step(int64_t n) {
  ZEAL_CHECK(n >= 0, "set_backwards_per_step: expected a count >= 0, got ", n);
  backwards_per_step_ = n;
  backwards_in_step_ = 0;  // a new batch (one that failed part way leaves nothing to count)
}

void Engine::backward(const at::Tensor& loss, bool retain_graph, bool scale_wrt_gas) {
  ZEAL_CHECK(loss.defined() && loss.numel() == 1, "backward expects a scalar loss, got a tensor of ",
             loss.defined() ? loss.numel() : 0, " elements");
  ZEAL_CHECK(loss.requires_grad(), "backward got a loss that does not require grad (was forward run under no_grad?)");
  const double value = loss.detach().to(at::kDouble).item<double>();
  loss_sum_ += value;
  ++loss_count_;
  pending_step_.loss += value;
  ++pending_step_.losses;
  double factor = precision_.loss_scale() / (scale_wrt_gas ? static_cast<double>(batch_.gradient_accumulation_steps) : 1.0);
  run_backward({loss}, {at::full_like(loss, factor, loss.options().requires_grad(false))}, retain_graph);
}

void Engine::backward_from(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& output_grads) {
  ZEAL_CHECK(outputs.size() == output_grads.size(), "backward_from got ", outputs.size(), " outputs and ",
             output_grads.size(), " gradients");
  for (size_t i = 0; i < outputs.size(); ++i)
    ZEAL_CHECK(outputs[i].sizes() == output_grads[i].sizes(), "backward_from: output ", i, " has shape ",
               outputs[i].sizes(), " but its gradient ", output_grads[i].sizes());
  run_backward(outputs, output_grads);
}

void Engine::run_backward(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& output_grads,
                          bool retain_graph) {
  auto start = Clock::now();
  const bool boundary = next_backward_is_boundary();
  if (backwards_per_step_ > 0) {
    ZEAL_CHECK(backwards_in_step_ < backwards_per_step_, "backward: all ", backwards_per_step_,
               " backwards of this step have run; call step() first");
    ++backwards_in_step_;
  }
  if (boundary) staged_buckets_ = 0;
  // 1-bit Adam past its freeze step reduces the momentum (compressed), not the gradients.
  reducer_->prepare(boundary && !optimizer_->local_gradients());
  torch::autograd::backward(outputs, output_grads, retain_graph);
  if (partition_) partition_->end_backward();
  if (boundary || reducer_->partitioned()) reducer_->finish();
  const double backward_s = seconds_since(start);
  backward_seconds_ += backward_s;
  pending_step_.backward_ms += backward_s * 1e3;
}

void Engine::step() {
  if (!is_gradient_accumulation_boundary()) {
    ++micro_steps_;
    return;
  }
  auto start = Clock::now();
  // This rank's gradients in fp32: all of them below stage 1, its owned chunks from stage 1 on
  // (stage 2 reduce-scattered them into grad_shard_).
  at::Tensor grads;
  const bool flat_step = optimizer_->wants_flat_segments();
  if (host_grads_options_ && staged_buckets_ == static_cast<int64_t>(reducer_->num_buckets())) {
    grads = host_grads_;  // offload: staged on the host bucket by bucket as the reduction finished them
    log("engine", LogLevel::kDebug, "step ", global_steps_ + 1, ": gradients staged on the host in ", staged_buckets_,
        " buckets during backward");
    if (device_.is_cuda()) (void)at::zeros({1}, at::TensorOptions().device(device_)).item<float>();
    // (a blocking read on the same stream: the non-blocking bucket copies queued before it are done)
  } else if (flat_step) {
    grads = flat_grads_;  // replicated optimizer state (stage 1): this rank's whole, unreduced gradient
  } else {
    grads = grad_shard_.defined() ? grad_shard_ : (partitioned_ ? gather_owned(flat_grads_) : flat_grads_);
  }
  staged_buckets_ = 0;
  if (host_grads_options_ && !grads.is_same(host_grads_)) {  // offload: to host fp32 in one copy
    if (!host_grads_.defined()) host_grads_ = at::empty({grads.numel()}, *host_grads_options_);
    host_grads_.copy_(grads);
    grads = host_grads_;
  } else if (grads.scalar_type() != at::kFloat) {
    grads = grads.to(at::kFloat);
  }

  // The precision policy (engine/precision.h): unscale, the global norm, overflow, clipping.
  const bool partitioned_grads = partitioned_ && !flat_step;
  auto any_rank = [this](bool flag) {  // local gradients overflow rank by rank: all skip if any does
    at::Tensor any = at::full({1}, flag ? 1.0 : 0.0, at::TensorOptions().dtype(at::kDouble));
    all_reduce_sum(any);
    return any.item<double>() > 0.0;
  };
  const PrecisionPolicy::Verdict verdict = precision_.judge(
      grads, [&](at::Tensor& g, double inv_scale) { return global_sum_squares(g, inv_scale, partitioned_grads); },
      optimizer_->local_gradients() && world_->size() > 1 ? std::function<bool(bool)>(any_rank) : nullptr);
  if (precision_.computes_grad_norm()) last_grad_norm_ = verdict.grad_norm;
  const bool overflow = verdict.overflow;
  last_step_overflow_ = overflow;
  if (overflow) {
    ++skipped_steps_;
    double before = precision_.loss_scale();
    precision_.update(true);
    log("engine", LogLevel::kInfo, "step ", global_steps_ + 1, ": fp16 gradient overflow, step skipped; loss scale ",
        before, " -> ", precision_.loss_scale());
  } else {
    precision_.clip(grads, last_grad_norm_);
    auto refresh = [this](std::vector<optim::ParamGroup>& segments, const std::vector<size_t>& group_of) {
      for (size_t k = 0; k < segments.size(); ++k) {  // the schedule may have moved lr and beta1
        segments[k].lr = groups_[group_of[k]].lr;
        segments[k].betas = groups_[group_of[k]].betas;
      }
    };
    refresh(segments_, segment_group_);
    refresh(flat_segments_, flat_segment_group_);
    if (swapper_) {
      step_swapped(grads);
    } else {
      optimizer_->step(master_, grads, flat_step ? flat_segments_ : segments_);
      publish_parameters(optimizer_->writes_model_copy() ? host_model_copy_ : master_);
    }
    precision_.update(false);
    apply_lr(++scheduler_iteration_);
  }
  if (grad_shard_.defined()) grad_shard_.zero_();
  if (flat_grads_.defined()) flat_grads_.zero_();
  backwards_in_step_ = 0;
  ++micro_steps_;
  ++global_steps_;
  global_samples_ += batch_.train_batch_size;
  const double step_s = seconds_since(start);
  step_seconds_ += step_s;
  pending_step_.step_ms += step_s * 1e3;
  if (pending_step_.losses) pending_step_.loss /= static_cast<double>(pending_step_.losses);
  last_step_ = pending_step_;
  pending_step_ = StepRecord{};
  if (global_steps_ % config_.steps_per_print == 0) log_step();
}

void Engine::zero_grad() {
  if (flat_grads_.defined()) flat_grads_.zero_();
  if (grad_shard_.defined()) grad_shard_.zero_();
}

void Engine::stage_bucket_on_host(int64_t flat_begin, int64_t flat_end, int64_t shard_begin, int64_t shard_end) {
  // ZeRO-Offload: this bucket's final gradients (owned part) go to the host buffer now, while the
  // reduction of later buckets, and with reduce-scatter the rest of backward, goes on.
  if (!host_grads_.defined()) host_grads_ = at::empty({layout_.shard_size(partitioned_)}, *host_grads_options_);
  const bool async = device_.is_cuda() && host_grads_.is_pinned();
  if (grad_shard_.defined()) {
    host_grads_.slice(0, shard_begin, shard_end).copy_(grad_shard_.slice(0, shard_begin, shard_end), async);
  } else {
    for (const zero::OwnedPiece& p : zero::owned_pieces_flat(owned_, flat_begin, flat_end))
      host_grads_.slice(0, p.local_begin, p.local_begin + p.size)
          .copy_(flat_grads_.slice(0, p.flat_begin, p.flat_begin + p.size), async);
  }
  ++staged_buckets_;
}

at::Tensor Engine::gather_owned(const at::Tensor& flat) const {
  std::vector<at::Tensor> pieces;
  for (const zero::OwnedRange& o : owned_) pieces.push_back(flat.slice(0, o.flat_begin, o.flat_end));
  // A rank can own nothing: a model of zero-element parameters, or more ranks than elements.
  if (pieces.empty()) return at::empty({0}, flat.options());
  return at::cat(pieces);
}

double Engine::global_sum_squares(const at::Tensor& grads, double inv_scale, bool partitioned) {
  double local = optim::unscale_and_sum_squares(grads, inv_scale);
  if (!uncounted_params_.empty()) {
    // Another rank of the model-parallel group counts these (already unscaled above).
    auto sum_sq_of = [](const at::Tensor& x) { return x.to(at::kDouble).pow(2).sum().item<double>(); };
    for (size_t i : uncounted_params_) {
      const int64_t b = layout_.offsets[i], e = b + layout_.numels[i];
      if (!partitioned) {
        local -= sum_sq_of(grads.slice(0, b, e));
        continue;
      }
      for (const zero::OwnedPiece& p : zero::owned_pieces_flat(owned_, b, e))
        local -= sum_sq_of(grads.slice(0, p.local_begin, p.local_begin + p.size));
    }
    local = std::max(local, 0.0);
  }
  double sum_sq = local;
  if (partitioned && world_->size() > 1) {
    // Each rank holds a disjoint part of the gradient: sum the squares across ranks.
    at::Tensor t = at::full({1}, local, at::TensorOptions().dtype(at::kDouble).device(grads.device()));
    all_reduce_sum(t);
    sum_sq = t.item<double>();
  }
  if (model_parallel_ && model_parallel_->size() > 1) {
    // Stages and shards hold disjoint parameters: the norm (and fp16's overflow) is the whole model's.
    at::Tensor t = at::full({1}, sum_sq, at::TensorOptions().dtype(at::kDouble));
    all_reduce_values(t, comm::ReduceOp::kSum, *model_parallel_);
    sum_sq = t.item<double>();
  }
  return sum_sq;
}

at::Tensor Engine::gather_whole(const at::Tensor& local) {
  at::Tensor whole = at::zeros({layout_.total}, local.options());
  for (const zero::OwnedPiece& p : zero::owned_pieces_local(owned_, 0, local.numel()))
    whole.slice(0, p.flat_begin, p.flat_begin + p.size).copy_(local.slice(0, p.local_begin, p.local_begin + p.size));
  if (world_->size() > 1) all_reduce_sum(whole);  // exact: every element is one rank's value plus zeros
  return whole;
}

void Engine::all_reduce_sum(at::Tensor& values) { all_reduce_values(values, comm::ReduceOp::kSum, *world_); }

void Engine::all_reduce_values(at::Tensor& values, comm::ReduceOp op, comm::Communicator& group) {
  // The MPI backend reduces host tensors and NCCL device tensors: values elsewhere (device values
  // over MPI, offloaded host values over NCCL) take a round trip.
  const bool mpi = group.backend_name() == "mpi";
  const bool moved = mpi ? !values.device().is_cpu() : values.device() != device_;
  at::Tensor buffer = !moved ? values : values.to(mpi ? at::Device(at::kCPU) : device_);
  group.all_reduce(buffer, {op})->wait();
  if (moved) values.copy_(buffer);
}

void Engine::publish_parameters(const at::Tensor& source) {
  if (!partitioned_) {
    if (model_dtype_ != at::kFloat) flat_params_.copy_(source);
    return;
  }
  write_model_values(0, source);
  gather_published();
}

void Engine::write_model_values(int64_t local_begin, const at::Tensor& values) {
  const int64_t local_end = local_begin + values.numel();
  if (partition_) {
    partition_->write_shard(local_begin, values);
    return;
  }
  for (const zero::OwnedPiece& p : zero::owned_pieces_local(owned_, local_begin, local_end))
    flat_params_.slice(0, p.flat_begin, p.flat_begin + p.size)
        .copy_(values.slice(0, p.local_begin - local_begin, p.local_begin - local_begin + p.size));
}

at::Tensor Engine::read_model_values(int64_t local_begin, int64_t local_end) {
  if (stage3_shard_.defined()) return stage3_shard_.slice(0, local_begin, local_end).to(at::kFloat);
  if (partition_) return partition_->read_shard(local_begin, local_end);
  at::Tensor out = at::empty({local_end - local_begin}, at::TensorOptions().dtype(at::kFloat));
  for (const zero::OwnedPiece& p : zero::owned_pieces_local(owned_, local_begin, local_end))
    out.slice(0, p.local_begin - local_begin, p.local_begin - local_begin + p.size)
        .copy_(flat_params_.slice(0, p.flat_begin, p.flat_begin + p.size));
  return out;
}

void Engine::gather_published() {
  if (partition_) {
    partition_->refresh();
    return;
  }
  if (world_->size() == 1) return;
  // Every rank wrote its updated chunks: all-gather each bucket so every rank has all weights.
  std::vector<comm::WorkPtr> works;
  std::vector<at::Tensor> inputs;
  size_t next_owned = 0;  // owned_ holds one range per non-empty bucket, in bucket order
  for (const zero::Bucket& bucket : layout_.buckets) {
    if (bucket.end == bucket.begin) continue;
    const zero::OwnedRange& mine = owned_[next_owned++];
    inputs.push_back(flat_params_.slice(0, mine.flat_begin, mine.flat_end).clone());
    at::Tensor output = flat_params_.slice(0, bucket.begin, bucket.end);
    works.push_back(world_->all_gather(output, inputs.back(), {}));
  }
  for (auto& w : works) w->wait();
}

void Engine::init_swap(int64_t shard) {
  if (config_.optimizer.type == OptimizerType::kSgd && config_.optimizer.momentum != 0.0)
    optimizer_->state("momentum_buffer");  // allocated on first use otherwise, and so not yet named
  std::vector<std::string> names{"master"};
  for (const std::string& name : optimizer_->state_names()) names.push_back(name);
  const OffloadOptimizerConfig& o = config_.zero_optimization.offload_optimizer;
  offload::NvmeSwapConfig swap;
  swap.nvme_path = o.nvme_path;
  swap.sub_group_size = config_.zero_optimization.sub_group_size;
  swap.buffer_count = o.buffer_count;
  swap.pipeline_read = o.pipeline_read;
  swap.pipeline_write = o.pipeline_write;
  swap.aio = config_.aio;
  swapper_ = std::make_unique<offload::OptimizerSwapper>(swap, shard, names);
  // Every sub-group starts as the model's values (cast to fp32) and the optimizer's initial state,
  // which the optimizer built for one sub-group and is the same for every element.
  swapper_->for_each(
      [&](int64_t k, std::vector<at::Tensor>& views) {
        views[0].copy_(read_model_values(swapper_->begin(k), swapper_->end(k)));
        for (size_t j = 1; j < views.size(); ++j)
          views[j].copy_(optimizer_->state(names[j]).slice(0, 0, views[j].numel()));
      },
      /*read=*/false, /*write_back=*/true);
  // The step binds the state to the swap buffers; the optimizer's own allocation is not needed again.
  for (size_t j = 1; j < names.size(); ++j) optimizer_->state(names[j]) = at::empty({0}, at::kFloat);
}

void Engine::step_swapped(const at::Tensor& grads) {
  optimizer_->begin_step();
  const std::vector<std::string>& names = swapper_->names();
  std::vector<optim::ParamGroup> local;
  swapper_->for_each(
      [&](int64_t k, std::vector<at::Tensor>& views) {
        const int64_t b = swapper_->begin(k), e = swapper_->end(k);
        for (size_t j = 1; j < views.size(); ++j) optimizer_->state(names[j]) = views[j];
        local.clear();  // the segments' pieces inside this sub-group, in its coordinates
        for (const optim::ParamGroup& segment : segments_) {
          const int64_t lo = std::max(segment.begin, b), hi = std::min(segment.end, e);
          if (lo >= hi) continue;
          optim::ParamGroup piece = segment;
          piece.begin = lo - b;
          piece.end = hi - b;
          local.push_back(piece);
        }
        at::Tensor grads_k = grads.slice(0, b, e);
        optimizer_->update(views[0], grads_k, local);
        write_model_values(b, views[0]);
      },
      /*read=*/true, /*write_back=*/true);
  gather_published();
}

void Engine::materialize_swapped() {
  const std::vector<std::string>& names = swapper_->names();
  std::vector<at::Tensor> full;
  for (size_t j = 0; j < names.size(); ++j)
    full.push_back(at::empty({swapper_->numel()}, at::TensorOptions().dtype(at::kFloat)));
  swapper_->for_each(
      [&](int64_t k, std::vector<at::Tensor>& views) {
        for (size_t j = 0; j < names.size(); ++j) full[j].slice(0, swapper_->begin(k), swapper_->end(k)).copy_(views[j]);
      },
      /*read=*/true, /*write_back=*/false);
  master_ = full[0];
  for (size_t j = 1; j < names.size(); ++j) optimizer_->state(names[j]) = full[j];
}

void Engine::release_swapped(bool write_back) {
  const std::vector<std::string>& names = swapper_->names();
  if (write_back) {
    swapper_->for_each(
        [&](int64_t k, std::vector<at::Tensor>& views) {
          const int64_t b = swapper_->begin(k), e = swapper_->end(k);
          views[0].copy_(master_.slice(0, b, e));
          for (size_t j = 1; j < names.size(); ++j) views[j].copy_(optimizer_->state(names[j]).slice(0, b, e));
        },
        /*read=*/false, /*write_back=*/true);
  }
  master_ = at::Tensor();
  for (size_t j = 1; j < names.size(); ++j) optimizer_->state(names[j]) = at::empty({0}, at::kFloat);
}

std::vector<double> Engine::get_lr() const {
  std::vector<double> out;
  for (const auto& g : groups_) out.push_back(g.lr);
  return out;
}

at::Tensor Engine::value_source(const std::string& what, bool& local) {
  ZEAL_CHECK(what == "grad" || (!swapper_ && master_.defined()), "the fp32 master weights and optimizer state of this "
             "engine live in NVMe swap files; read them from a checkpoint (zeal.checkpoint.to_fp32_state_dict)");
  if (what == "grad") {
    local = !flat_grads_.defined();  // stages 0, 1: the whole flat gradient; 2, 3: this rank's shard
    return local ? grad_shard_ : flat_grads_;
  }
  local = true;  // master and state cover the owned elements (all of them below stage 1)
  if (what == "fp32") return master_;
  const std::vector<std::string> names = optimizer_->state_names();
  if (std::find(names.begin(), names.end(), what) == names.end()) {
    std::string list;
    for (const std::string& n : names) list += (list.empty() ? "" : ", ") + n;
    ZEAL_CHECK(false, "the optimizer (", optimizer_->name(), ") has no state '", what, "'; it has ",
               list.empty() ? std::string("none yet") : list);
  }
  return optimizer_->state(what);
}

at::Tensor Engine::full_value(size_t i, const std::string& what) {
  ZEAL_CHECK(i < params_.size(), "parameter index ", i, " out of range");
  bool local = false;
  at::Tensor source = value_source(what, local);
  const int64_t numel = layout_.numels[i];
  if (!local) return source.slice(0, layout_.offsets[i], layout_.offsets[i] + numel).to(at::kFloat).reshape(shapes_[i]);
  at::Tensor whole = at::zeros({numel}, at::TensorOptions().dtype(at::kFloat).device(source.device()));
  for (const zero::Fragment& f : fragments())
    if (f.param == static_cast<int64_t>(i))
      whole.slice(0, f.begin, f.end).copy_(source.slice(0, f.local, f.local + (f.end - f.begin)));
  // Each element is one rank's value plus zeros: the sum is exact.
  if (partitioned_ && world_->size() > 1) all_reduce_sum(whole);
  return whole.reshape(shapes_[i]);
}

void Engine::set_full_value(size_t i, const std::string& what, const at::Tensor& value) {
  ZEAL_CHECK(i < params_.size(), "parameter index ", i, " out of range");
  ZEAL_CHECK(what != "grad", "gradients are set by backward, not set_full_value");
  ZEAL_CHECK(value.numel() == layout_.numels[i], "parameter '", names_[i], "' has ", layout_.numels[i],
             " elements, the value given has ", value.numel());
  bool local = false;
  at::Tensor target = value_source(what, local);
  const at::Tensor flat = value.detach().reshape({-1}).to(target.options());
  for (const zero::Fragment& f : fragments())
    if (f.param == static_cast<int64_t>(i))
      target.slice(0, f.local, f.local + (f.end - f.begin)).copy_(flat.slice(0, f.begin, f.end));
  if (what != "fp32") return;
  if (partition_) {
    // Stage 3 gathers the parameter from its shard: the owned chunks take the new values too.
    for (const zero::Fragment& f : fragments())
      if (f.param == static_cast<int64_t>(i)) partition_->write_shard(f.local, master_.slice(0, f.local, f.local + (f.end - f.begin)));
    partition_->refresh();
    return;
  }
  publish_parameters(master_);
}

void Engine::set_lr(const std::vector<double>& lrs) {
  ZEAL_CHECK(lrs.size() == groups_.size(), "set_lr got ", lrs.size(), " learning rates for ", groups_.size(),
             " parameter groups");
  for (size_t g = 0; g < groups_.size(); ++g) {
    ZEAL_CHECK(std::isfinite(lrs[g]) && lrs[g] >= 0.0, "set_lr: group ", g, " learning rate must be a finite number "
               ">= 0, got ", lrs[g]);
    groups_[g].lr = lrs[g];
  }
}

std::vector<double> Engine::get_mom() const {
  std::vector<double> out;
  const bool sgd = config_.optimizer.present && config_.optimizer.type == OptimizerType::kSgd;
  for (const optim::ParamGroup& g : groups_) out.push_back(sgd ? g.momentum : g.betas[0]);
  return out;
}

std::vector<std::array<int64_t, 3>> Engine::segments() const {
  std::vector<std::array<int64_t, 3>> out;
  for (size_t k = 0; k < segments_.size(); ++k)
    out.push_back({static_cast<int64_t>(segment_group_[k]), segments_[k].begin, segments_[k].end});
  return out;
}

void Engine::apply_lr(int64_t iteration) {
  if (!schedule_) return;
  for (size_t g = 0; g < groups_.size(); ++g) {
    groups_[g].lr = schedule_->lr(iteration, base_lrs_[g]);
    // DeepSpeed's OneCycle writes betas = (momentum, 0.99) while it cycles momentum.
    if (auto beta1 = schedule_->beta1(iteration); beta1 && config_.optimizer.type != OptimizerType::kSgd)
      groups_[g].betas = {*beta1, 0.99};
  }
}

void Engine::log_step() {
  double elapsed = seconds_since(last_log_time_);
  double samples_per_s = elapsed > 0 ? static_cast<double>(global_samples_ - last_log_samples_) / elapsed : 0.0;
  double loss = loss_count_ ? loss_sum_ / static_cast<double>(loss_count_) : 0.0;
  log("engine", LogLevel::kInfo, "step ", global_steps_, " | loss ", format_number("%.4f", loss), " | lr ",
      format_number("%.3e", groups_.front().lr), " | loss scale ", format_number("%g", precision_.loss_scale()), " | ",
      format_number("%.1f", samples_per_s), " samples/s",
      skipped_steps_ ? " | skipped " + std::to_string(skipped_steps_) : std::string());
  if (config_.wall_clock_breakdown) {
    log("engine", LogLevel::kInfo, "step ", global_steps_, " | time (ms) forward ",
        format_number("%.1f", forward_seconds_ * 1e3), " | backward ", format_number("%.1f", backward_seconds_ * 1e3),
        " | step ", format_number("%.1f", step_seconds_ * 1e3));
  }
  forward_seconds_ = backward_seconds_ = step_seconds_ = 0.0;
  loss_sum_ = 0.0;
  loss_count_ = 0;
  last_log_time_ = Clock::now();
  last_log_samples_ = global_samples_;
}

}  // namespace zeal::engine
