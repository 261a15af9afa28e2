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

// This rank's chunk (c elements, model dtype) of a stage-3 parameter of numel elements: zero::Init's
// (`given`, checked against the group's size) or cut from the group's first rank's whole value.
at::Tensor stage3_chunk(const std::string& name, const at::Tensor& given, const at::Tensor& whole, int64_t numel,
                        int64_t c, comm::Communicator& group, const at::TensorOptions& options) {
  const int size = group.size(), rank = group.rank();
  if (given.defined()) {
    ZEAL_CHECK(given.numel() == c, "parameter '", name, "' arrived with a chunk of ", given.numel(),
               " elements; a data-parallel size of ", size, " needs ", c, " (was zeal.zero.Init run over another group?)");
    return given.reshape({-1}).to(options);
  }
  at::Tensor full = at::zeros({c * size}, options);
  full.slice(0, 0, numel).copy_(whole.detach().reshape({-1}));
  if (size > 1) group.broadcast(full, {0})->wait();
  return full.slice(0, rank * c, (rank + 1) * c).clone();
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

  // Collect the trainable parameters group by group, skipping repeats (tied weights); frozen ones
  // aside (Note [Frozen parameters]).
  std::unordered_set<c10::TensorImpl*> seen;
  std::vector<at::Tensor> frozen, frozen_chunks;
  std::vector<std::string> frozen_names;
  std::vector<std::vector<int64_t>> frozen_shapes;
  std::vector<size_t> group_of_param;
  std::vector<at::Tensor> given_chunks;  // zero::Init's chunks, parallel to params_
  std::vector<parallel::Placement> placements;  // parallel to params_
  for (size_t g = 0; g < specs.size(); ++g) {
    const ParamGroupSpec& spec = specs[g];
    for (size_t k = 0; k < spec.params.size(); ++k) {
      const at::Tensor& p = spec.params[k];
      ZEAL_CHECK(p.defined(), "parameter group ", g, " holds an undefined tensor");
      if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
      std::string name = k < spec.names.size() ? spec.names[k] : "group" + std::to_string(g) + "." + std::to_string(k);
      const bool pre_partitioned = k < spec.chunks.size() && spec.chunks[k].defined();
      if (!p.requires_grad()) {
        if (config_.zero_optimization.stage == 3 && p.is_leaf() && at::isFloatingType(p.scalar_type())) {
          frozen.push_back(p);
          frozen_names.push_back(std::move(name));
          frozen_shapes.push_back(pre_partitioned ? spec.full_shapes[k] : p.sizes().vec());
          frozen_chunks.push_back(pre_partitioned ? spec.chunks[k] : at::Tensor());
        }
        continue;
      }
      ZEAL_CHECK(p.is_leaf(), "parameter '", name, "' is not a leaf tensor; pass the model's parameters");
      if (params_.empty()) device_ = p.device();
      ZEAL_CHECK(p.device() == device_, "parameters on ", device_.str(), " and ", p.device().str(),
                 ": one engine trains the parameters of one device");
      ZEAL_CHECK(at::isFloatingType(p.scalar_type()), "parameter '", name, "' of dtype ",
                 c10::toString(p.scalar_type()), " cannot be trained");
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
  stage_ = config_.zero_optimization.stage;
  partitioned_ = stage_ >= 1;
  make_units(placements);
  batch_ = config_.resolve_batch(parallel::samples_group_size(mesh_->mesh()));  // Note [Samples per step]
  ZEAL_CHECK_AS(ConfigError, units_.size() == 1 || !client_optimizer,
                "the optimizer passed to initialize (optimizer=) steps one flat buffer, and this model's parameters "
                "reduce over ", units_.size(), " groups (", mesh_->mesh().key(units_[0]->axes), ", ",
                mesh_->mesh().key(units_[1]->axes), "); use a config 'optimizer' section");
  zero::FrozenParams frozen_spec;  // Note [Frozen parameters]: partitioned with a one-unit engine's
  frozen_spec.quantized = config_.zero_optimization.quantized_nontrainable_weights;
  if (!frozen.empty() && units_.size() == 1) {
    Unit& u = *units_.front();
    const int size = u.world->size();
    auto options = at::TensorOptions().dtype(model_dtype_).device(device_);
    for (size_t k = 0; k < frozen.size(); ++k) {
      ZEAL_CHECK(frozen[k].device() == device_, "frozen parameter '", frozen_names[k], "' is on ",
                 frozen[k].device().str(), " and the trained ones on ", device_.str());
      const int64_t numel = c10::multiply_integers(frozen_shapes[k]), c = (numel + size - 1) / size;
      frozen_spec.chunks.push_back(
          stage3_chunk(frozen_names[k], frozen_chunks[k], frozen[k], numel, c, *u.world, options));
    }
    frozen_spec.params = frozen_params_ = frozen;
    frozen_spec.shapes = frozen_shapes_ = frozen_shapes;
    frozen_names_ = std::move(frozen_names);
  } else if (!frozen.empty()) {
    for (size_t k = 0; k < frozen.size(); ++k)
      ZEAL_CHECK(!frozen_chunks[k].defined(), "frozen parameter '", frozen_names[k], "' was partitioned by "
                 "zeal.zero.Init, but this engine's parameters reduce over ", units_.size(), " groups and it "
                 "partitions frozen parameters only with one; build the model outside zero.Init");
    ZEAL_CHECK_AS(ConfigError, !frozen_spec.quantized, "config key 'zero_optimization."
                  "zero_quantized_nontrainable_weights': frozen parameters are partitioned (and so quantized) only "
                  "when every parameter reduces over one group; this engine's reduce over ", units_.size());
    log("engine", LogLevel::kInfo, frozen.size(), " frozen parameters stay whole on every rank: the engine's "
        "parameters reduce over ", units_.size(), " groups");
  }
  for (auto& u : units_)
    build_unit(*u, given_chunks, group_of_param, std::move(client_optimizer),
               u.get() == units_.front().get() ? std::move(frozen_spec) : zero::FrozenParams());
  if (config_.scheduler.present) schedule_ = optim::make_lr_schedule(config_.scheduler);
  precision_ = PrecisionPolicy(config_, stage_ >= 1);
  apply_lr(-1);

  int64_t n_params = 0;
  for (size_t i = 0; i < params_.size(); ++i) n_params += c10::multiply_integers(shapes_[i]);
  std::string layout;
  for (const auto& u : units_)
    layout += (layout.empty() ? "" : ", ") + std::to_string(u->members.size()) + " over " +
              mesh_->mesh().key(u->axes) + " (" + std::to_string(u->world->size()) + " ranks)";
  log("engine", LogLevel::kInfo, n_params, " parameters in ", groups_.size(), " groups, ", num_buckets(),
      " buckets; ZeRO stage ", stage_, "; precision ", c10::toString(model_dtype_), "; optimizer ", optimizer().name(),
      "; batch ", batch_.train_batch_size, " = micro ", batch_.micro_batch_size, " x accumulation ",
      batch_.gradient_accumulation_steps, " x data-parallel ", parallel::samples_group_size(mesh_->mesh()),
      units_.size() > 1 ? "; parameters reduce in " + std::to_string(units_.size()) + " units: " + layout : "",
      frozen_params_.empty() ? "" : "; " + std::to_string(frozen_params_.size()) + " frozen parameters partitioned" +
          (config_.zero_optimization.quantized_nontrainable_weights ? ", stored as 8-bit blocks" : ""));
  last_log_time_ = Clock::now();
}

void Engine::build_unit(Unit& u, const std::vector<at::Tensor>& given_chunks, const std::vector<size_t>& group_of_param,
                        std::unique_ptr<optim::Optimizer> client_optimizer, zero::FrozenParams frozen) {
  // The flat layout (zero/layout.h): reduction order, buckets padded to the group's size.
  // Stage 3 gives every parameter a bucket of its own: the unit it is gathered and released in.
  std::vector<int64_t> numels;
  for (const auto& shape : u.shapes) numels.push_back(c10::multiply_integers(shape));
  const bool reduce_scatter = stage_ == 3 || (stage_ == 2 && config_.zero_optimization.reduce_scatter);
  u.layout = zero::make_flat_layout(numels, stage_ == 3 ? 1 : config_.zero_optimization.reduce_bucket_size,
                                    u.world->size());
  u.owned = u.layout.owned(u.world->rank(), partitioned_);
  const int64_t total = u.layout.total;
  const int64_t shard = u.shard_size();
  auto options = at::TensorOptions().dtype(model_dtype_).device(device_);

  u.store = std::make_unique<MasterStore>(config_, model_dtype_, device_);
  MasterStore& store = *u.store;
  const bool nvme = store.nvme();
  if (stage_ == 3) {
    std::vector<at::Tensor> chunks;
    for (size_t i : u.members) chunks.push_back(given_chunks[i]);
    init_stage3(u, chunks, options, /*with_master=*/!nvme);
  } else {
    // One flat buffer per role; the user's tensors become views of it (set_data keeps the same
    // tensor objects, so Python and C++ callers see the change). Padding stays zero.
    u.flat_params = at::zeros({total}, options);
    if (!reduce_scatter) u.flat_grads = at::zeros({total}, options);
    for (size_t i = 0; i < u.params.size(); ++i) {
      at::Tensor& p = u.params[i];
      int64_t n = p.numel(), offset = u.layout.offsets[i];
      u.flat_params.slice(0, offset, offset + n).copy_(p.detach().reshape({n}));
      p.set_data(u.flat_params.slice(0, offset, offset + n).view(p.sizes()));
      if (u.flat_grads.defined()) p.mutable_grad() = u.flat_grads.slice(0, offset, offset + n).view(p.sizes());
    }
    // Every replica starts from the group's first rank's weights.
    if (u.world->size() > 1) u.world->broadcast(u.flat_params, {0})->wait();
    // fp32 master weights and optimizer state cover this rank's owned elements only (all of them
    // below stage 1). NVMe offload keeps them in swap files instead (set up below).
    if (!nvme)
      store.place(partitioned_ ? u.gather_owned(u.flat_params).to(at::kFloat)
                               : (model_dtype_ == at::kFloat ? u.flat_params : u.flat_params.to(at::kFloat)));
  }
  // The optimizer runs where the master weights live (Note [Master store]): with offload, on the CPU
  // kernels, a sub-group at a time with NVMe.
  const bool offload = store.offload();
  const int64_t sub_group = nvme ? std::max<int64_t>(1, std::min(config_.zero_optimization.sub_group_size, shard)) : shard;
  u.optimizer = client_optimizer ? std::move(client_optimizer)
                                 : optim::make_optimizer(config_.optimizer, sub_group,
                                                         offload ? at::Device(at::kCPU) : device_,
                                                         static_cast<int64_t>(u.params.size()), partitioned_);
  optim::Optimizer& optimizer = *u.optimizer;
  store.bind(optimizer, shard, [&u](int64_t b, int64_t e) { return u.read_model_values(b, e); });
  Unit* unit = &u;
  if (config_.optimizer.compressed() && u.world->size() > 1)
    optimizer.set_compressed_averager(
        [unit](at::Tensor& values) { comm::compressed_all_reduce(*unit->world, values, unit->onebit_state); },
        [unit] { unit->onebit_state.reset(); });
  if (partitioned_) optimizer.set_gatherer([unit](const at::Tensor& local) { return unit->gather_whole(local); });
  // The optimizer's segments (zero/segments.h); with replicated optimizer state at stage 1 (Note
  // [Replicated momentum] in optim/optimizer.cpp) also in flat coordinates.
  zero::SegmentSpec segment_spec;
  segment_spec.layout = &u.layout;
  segment_spec.owned = &u.owned;
  segment_spec.groups = groups_;
  for (size_t i : u.members) segment_spec.group_of_param.push_back(group_of_param[i]);
  segment_spec.per_tensor = optimizer.per_tensor();
  segment_spec.flat_state = partitioned_ && config_.optimizer.compressed();
  zero::Segments segments = zero::build_segments(segment_spec);
  u.segments = std::move(segments.local);
  u.segment_group = std::move(segments.group_of);
  u.flat_segments = std::move(segments.flat);
  u.flat_segment_group = std::move(segments.flat_group_of);
  if (optimizer.per_tensor() && partitioned_ && u.world->size() > 1) {
    // A parameter's pieces may sit on several ranks: the optimizer's per-tensor sums add across them.
    optimizer.set_sum_reducer([unit](at::Tensor& sums) { unit->all_reduce_sum(sums); });
    optimizer.set_max_reducer(
        [unit](at::Tensor& values) { unit->all_reduce(values, comm::ReduceOp::kMax, *unit->world); });
  }
  if (reduce_scatter) u.grad_shard = at::zeros({shard}, options);

  GradHooks hooks;
  if (stage_ == 3) {
    hooks.before_accumulate = [unit](size_t i) { unit->partition->shape_only(i); };
    hooks.after_accumulate = [unit](size_t i) { unit->partition->release(i); };
  }
  // The reducer creates the gradient accumulators, which record each parameter's shape: so it
  // comes before stage 3 releases the parameters.
  u.reducer = std::make_unique<GradReducer>(u.params, u.layout, u.flat_grads, u.grad_shard, u.world, config_, hooks,
                                           u.grad_divisor);
  if (u.replicas) u.reducer->set_replicas(u.replicas);  // Note [MiCS]
  if (store.stages_gradients())
    u.reducer->set_bucket_final([this, unit](int64_t flat_begin, int64_t flat_end, int64_t shard_begin, int64_t shard_end) {
      stage_bucket_on_host(*unit, flat_begin, flat_end, shard_begin, shard_end);
    });
  if (stage_ == 3) {
    // offload_param: the shard in host memory, or in a swap file.
    const OffloadParamConfig& op = config_.zero_optimization.offload_param;
    zero::ParamPartition::Offload param_offload;
    param_offload.host_shard = op.device == OffloadDevice::kCpu;
    if (op.device == OffloadDevice::kNvme) param_offload.nvme_path = op.nvme_path;
    param_offload.aio = config_.aio;
    param_offload.quantized_weights = config_.zero_optimization.quantized_weights;
    const int64_t hpz = config_.zero_optimization.hpz_partition_size;
    comm::CommunicatorPtr node, across_nodes;  // hpZ's groups (Note [Secondary partition], zero/param_partition.h)
    if (hpz > 1 && u.world->size() > 1) {
      ZEAL_CHECK_AS(ConfigError, mesh_->mesh().axis_size("data_inner") == hpz &&
                                     std::find(u.axes.begin(), u.axes.end(), "data_inner") != u.axes.end(),
                    "config key 'zero_optimization.zero_hpz_partition_size' is ", hpz, ", but the engine's mesh ",
                    mesh_->mesh().key(u.axes), " has data_inner ", mesh_->mesh().axis_size("data_inner"),
                    " (zeal.initialize builds the mesh with data_inner = zero_hpz_partition_size)");
      std::vector<std::string> across;
      for (const auto& a : u.axes)
        if (a != "data_inner") across.push_back(a);
      node = counted(mesh_->group_on({"data_inner"}, device_), {"data_inner"});
      across_nodes = counted(mesh_->group_on(across, device_), across);
      u.counted_groups.insert(u.counted_groups.end(), {node, across_nodes});
      param_offload.hpz_intra = node;
      param_offload.hpz_inter = across_nodes;
    }
    // Note [Quantized gradient reduction] (engine/grad_reducer.cpp): within hpZ's node groups, then
    // across them; without hpZ, one level over the unit's group.
    if (config_.zero_optimization.quantized_gradients && u.world->size() > 1) {
      u.reducer->set_quantized_gradients(node, node ? across_nodes : u.world);
      const ZeroConfig::Loco& loco = config_.zero_optimization.loco;
      if (loco.enabled) u.reducer->set_loco(static_cast<float>(loco.err_beta), loco.reset_T);
    } else if (config_.zero_optimization.loco.enabled && u.world->rank() == 0) {
      log("engine", LogLevel::kWarn, "zero_optimization.zeropp_loco_param is set but has no effect: LoCo is "
          "error feedback for quantized gradients, and ", u.world->size() > 1 ? "zero_quantized_gradients is off"
          : "there is one data-parallel rank (nothing is reduced)");
    }
    u.partition = std::make_unique<zero::ParamPartition>(u.params, u.shapes, u.layout, u.stage3_shard, u.world,
                                                         config_.zero_optimization.param_persistence_threshold,
                                                         param_offload, std::move(frozen));
  }
  u.stage3_shard.reset();
}

Engine::~Engine() = default;

comm::CommunicatorPtr Engine::counted(comm::CommunicatorPtr group, const std::vector<std::string>& axes) const {
  if (!config_.comms_logger.enabled) return group;
  const CommsLoggerConfig& c = config_.comms_logger;
  std::set<std::string> ops;
  if (!c.prof_all) ops.insert(c.prof_ops.begin(), c.prof_ops.end());
  return std::make_shared<comm::CountingCommunicator>(group, ops, c.verbose,
                                                      mesh_->mesh().group_of(axes, mesh_->rank()),
                                                      comm::ranks_per_node());
}

void Engine::make_units(const std::vector<parallel::Placement>& placements) {
  // Note [Parameter placement]: each parameter's reduction group and whether this rank counts it in
  // the norm follow from its tags; Note [Sharded-state units]: parameters that share a reduction
  // group share a unit. Every rank sees the same parameters in the same order with the same tags, so
  // every rank makes the same units in the same order (their collectives pair up).
  const parallel::Mesh& mesh = mesh_->mesh();
  const int64_t mics_size = config_.zero_optimization.mics_shard_size;
  const bool mics = mics_size > 0;
  ZEAL_CHECK_AS(ConfigError, !mics || mesh.axis_size("data_inner") == mics_size,
                "config key 'zero_optimization.mics_shard_size' is ", mics_size, ", but the engine's mesh has "
                "data_inner ", mesh.axis_size("data_inner"), " (zeal.initialize builds the mesh with data_inner = "
                "mics_shard_size)");
  for (size_t i = 0; i < params_.size(); ++i) {
    std::vector<std::string> axes = parallel::reduction_axes(mesh, placements[i]);
    // Note [MiCS]: ZeRO-3 over the shard group (data_inner, of mics_shard_size ranks, and any other
    // axis the gradients reduce over but data), with the data axis's ranks holding identical
    // replicas: the unit's group is the shard group; the gradients are summed over the replicas too
    // (GradReducer::set_replicas), and a checkpoint is written by the first replica (save_checkpoint).
    std::vector<std::string> replica_axes;
    if (mics && std::count(axes.begin(), axes.end(), "data")) {
      axes.erase(std::find(axes.begin(), axes.end(), "data"));
      replica_axes = {"data"};
    }
    size_t k = 0;
    while (k < units_.size() && units_[k]->axes != axes) ++k;
    if (k == units_.size()) {
      // Host parameters reduce over MPI, device ones over NCCL (Note [Backend by device]).
      comm::CommunicatorPtr world = counted(mesh_->group_on(axes, device_), axes);
      std::vector<std::string> replica_and_shard = axes;
      replica_and_shard.insert(replica_and_shard.end(), replica_axes.begin(), replica_axes.end());
      const comm::CommunicatorPtr& rest = mesh_->group(mesh.other_axes(replica_and_shard));
      units_.push_back(std::make_unique<Unit>(axes, world, rest->size() > 1 ? rest : nullptr, model_dtype_, device_,
                                              partitioned_));
      if (units_[k]->world->size() > units_[primary_]->world->size()) primary_ = k;
      units_[k]->grad_divisor = parallel::gradient_divisor(mesh, placements[i]);
      if (!replica_axes.empty() && mesh.axis_size("data") > 1) {
        units_[k]->replicas = counted(mesh_->group_on(replica_axes, device_), replica_axes);
        units_[k]->counted_groups.push_back(units_[k]->replicas);
      }
    }
    Unit& u = *units_[k];
    unit_of_.push_back(k);
    index_in_unit_.push_back(u.members.size());
    if (!parallel::counts_in_norm(mesh, mesh_->rank(), placements[i])) u.uncounted.push_back(u.members.size());
    u.members.push_back(i);
    u.params.push_back(params_[i]);
    u.shapes.push_back(shapes_[i]);
  }
}

Unit& Engine::only_unit(const char* what) const {
  if (units_.size() != 1) {
    std::string groups;
    for (const auto& u : units_) groups += (groups.empty() ? "" : ", ") + mesh_->mesh().key(u->axes);
    ZEAL_CHECK(false, what, " covers the parameters of one reduction group; this engine's parameters reduce over ",
               units_.size(), " (", groups, "), each unit with its own shard");
  }
  return *units_.front();
}

size_t Engine::num_buckets() const {
  size_t n = 0;
  for (const auto& u : units_) n += u->reducer->num_buckets();
  return n;
}

int64_t Engine::flat_numel() const {
  int64_t n = 0;
  for (const auto& u : units_) n += u->layout.total;
  return n;
}

int64_t Engine::master_numel() const {
  int64_t n = 0;
  for (const auto& u : units_) n += u->shard_size();
  return n;
}

int64_t Engine::grad_shard_numel() const {
  int64_t n = 0;
  for (const auto& u : units_) n += u->grad_shard.defined() ? u->grad_shard.numel() : 0;
  return n;
}

std::map<std::string, comm::OpCount> Engine::comms_counts() const {
  std::map<std::string, comm::OpCount> out;
  for (const auto& u : units_) {
    std::vector<comm::CommunicatorPtr> groups = u->counted_groups;
    groups.push_back(u->world);
    for (const auto& g : groups) {
      auto* counting = dynamic_cast<comm::CountingCommunicator*>(g.get());
      if (!counting) continue;
      for (const auto& [op, count] : counting->counts()) {
        out[op].calls += count.calls;
        out[op].bytes += count.bytes;
        out[op].intra_node_bytes += count.intra_node_bytes;
        out[op].inter_node_bytes += count.inter_node_bytes;
      }
    }
  }
  return out;
}

int64_t Engine::skipped_comm_rounds() const { return units_.front()->optimizer->skipped_rounds(); }

void Engine::init_stage3(Unit& u, const std::vector<at::Tensor>& given_chunks, const at::TensorOptions& options,
                         bool with_master) {
  // This rank's chunk of every parameter, from zero::Init or cut from the group's first rank's value.
  at::Tensor shard = at::zeros({u.layout.shard_size(true)}, options);
  const int size = u.world->size();
  int64_t local = 0;
  for (const zero::Bucket& b : u.layout.buckets) {
    const int64_t c = b.chunk(size);
    for (size_t i : b.params) {
      if (u.layout.numels[i] == 0) continue;
      shard.slice(0, local, local + c)
          .copy_(stage3_chunk(names_[u.members[i]], given_chunks[i], u.params[i], u.layout.numels[i], c, *u.world,
                              options));
    }
    local += c;
  }
  if (with_master) u.store->place(shard.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true));
  u.stage3_shard = shard;
  // Parameters given whole still have their shape here, which the gradient accumulators record.
  for (size_t i = 0; i < u.params.size(); ++i)
    if (u.params[i].numel() != u.layout.numels[i]) u.params[i].set_data(at::empty(u.shapes[i], options));
}

std::pair<zero::ParamPartition*, size_t> Engine::stage3_slot(size_t i) {
  ZEAL_CHECK(stage_ == 3, "this operation needs ZeRO stage 3; the engine runs stage ", stage_);
  ZEAL_CHECK(i < params_.size() + frozen_params_.size(), "parameter index ", i, " out of range (",
             params_.size(), " trainable and ", frozen_params_.size(), " frozen parameters)");
  if (i < params_.size()) return {unit_of(i).partition.get(), index_in_unit(i)};
  Unit& u = *units_.front();  // frozen parameters are partitioned with one unit only
  return {u.partition.get(), u.members.size() + (i - params_.size())};
}

size_t Engine::engine_index(const Unit& u, size_t j) const {
  return j < u.members.size() ? u.members[j] : params_.size() + (j - u.members.size());
}

void Engine::absorb_parameter(size_t i) {
  if (i >= params_.size()) {  // frozen: its own chunk only (Note [Frozen parameters])
    auto [p, j] = stage3_slot(i);
    p->absorb(j, nullptr);
    return;
  }
  Unit& u = unit_of(i);
  const size_t j = index_in_unit(i);
  ZEAL_CHECK(u.partition, "absorb_parameter is for ZeRO stage 3");
  if (!u.store->swapper()) {
    u.partition->absorb(j, &u.store->master());
    return;
  }
  // The swapped master takes the chunk too.
  u.partition->absorb(j, nullptr);
  const int64_t lo = u.partition->chunk_begin(j);
  u.store->patch(lo, u.partition->read_shard(lo, lo + u.partition->chunk_size(j)));
}

std::vector<std::pair<std::string, int64_t>> Engine::state_bytes() const {
  auto bytes = [](const at::Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : int64_t{0}; };
  int64_t params = 0, grads = 0, master = 0, optimizer = 0;
  for (const auto& unit : units_) {
    const Unit& u = *unit;
    grads += bytes(u.flat_grads) + bytes(u.grad_shard) + u.store->grad_bytes();
    params += u.store->model_copy_bytes();
    if (u.partition) {
      params += bytes(u.partition->shard()) + u.partition->frozen_bytes() + u.partition->secondary_bytes();
      for (size_t i = 0; i < u.partition->size(); ++i)
        if (u.partition->live(i)) params += bytes(u.partition->full(i));
    } else {
      params += bytes(u.flat_params);
    }
    master += u.store->master_bytes(u.flat_params);
    optimizer += u.store->optimizer_bytes(*u.optimizer);
  }
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
  // One autograd pass fills every unit's buckets; each unit reduces over its own group.
  for (auto& u : units_) {
    if (boundary) u->store->begin_backward();
    // 1-bit Adam past its freeze step reduces the momentum (compressed), not the gradients.
    u->reducer->prepare(boundary && !u->optimizer->local_gradients());
  }
  torch::autograd::backward(outputs, output_grads, retain_graph);
  for (auto& u : units_) {
    if (u->partition) u->partition->end_backward();
    if (boundary || u->reducer->partitioned()) u->reducer->finish();
  }
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
  // The precision policy (engine/precision.h): unscale, the global norm over every unit, overflow,
  // clipping; then each unit's optimizer updates its own master weights.
  const bool flat_step = optimizer().wants_flat_segments();
  const bool partitioned_grads = partitioned_ && !flat_step;
  std::vector<at::Tensor> grads;
  for (auto& u : units_) grads.push_back(step_gradients(*u, flat_step));
  auto any_rank = [this](bool flag) {  // local gradients overflow rank by rank: all skip if any does
    at::Tensor any = at::full({1}, flag ? 1.0 : 0.0, at::TensorOptions().dtype(at::kDouble));
    for (auto& u : units_) u->all_reduce_sum(any);
    return any.item<double>() > 0.0;
  };
  bool reduced_apart = false;  // whether some rank's gradients are its own (0/1 Adam's local steps)
  for (auto& u : units_) reduced_apart = reduced_apart || (u->optimizer->local_gradients() && u->world->size() > 1);
  const PrecisionPolicy::Verdict verdict = precision_.judge(
      [&](double inv_scale) {
        double sum = 0.0;
        for (size_t k = 0; k < units_.size(); ++k)
          sum += units_[k]->global_sum_squares(grads[k], inv_scale, partitioned_grads);
        return sum;
      },
      [&](double inv_scale) {
        for (at::Tensor& g : grads) g.mul_(inv_scale);
      },
      reduced_apart ? std::function<bool(bool)>(any_rank) : nullptr);
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
    auto refresh = [this](std::vector<optim::ParamGroup>& segments, const std::vector<size_t>& group_of) {
      for (size_t k = 0; k < segments.size(); ++k) {  // the schedule may have moved lr and beta1
        segments[k].lr = groups_[group_of[k]].lr;
        segments[k].betas = groups_[group_of[k]].betas;
      }
    };
    for (size_t k = 0; k < units_.size(); ++k) {
      Unit& u = *units_[k];
      precision_.clip(grads[k], last_grad_norm_);
      refresh(u.segments, u.segment_group);
      refresh(u.flat_segments, u.flat_segment_group);
      const at::Tensor updated =
          u.store->step(*u.optimizer, grads[k], flat_step ? u.flat_segments : u.segments,
                        [&u](int64_t local_begin, const at::Tensor& values) { u.write_model_values(local_begin, values); });
      if (updated.defined()) {
        u.publish(updated);
      } else {
        u.gather_published();  // NVMe: each sub-group was written as it was stepped
      }
    }
    precision_.update(false);
    apply_lr(++scheduler_iteration_);
  }
  zero_grad();
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

at::Tensor Engine::step_gradients(Unit& u, bool flat_step) {
  // This rank's gradients in fp32: all of them below stage 1, its owned chunks from stage 1 on
  // (stage 2 reduce-scattered them into grad_shard); with offload, staged on the host.
  return u.store->step_gradients(
      [&] {
        if (flat_step) return u.flat_grads;  // replicated optimizer state (stage 1): the whole, unreduced gradient
        return u.grad_shard.defined() ? u.grad_shard : (partitioned_ ? u.gather_owned(u.flat_grads) : u.flat_grads);
      },
      u.reducer->num_buckets());
}

void Engine::zero_grad() {
  for (auto& u : units_) {
    if (u->flat_grads.defined()) u->flat_grads.zero_();
    if (u->grad_shard.defined()) u->grad_shard.zero_();
  }
}

void Engine::stage_bucket_on_host(Unit& u, int64_t flat_begin, int64_t flat_end, int64_t shard_begin, int64_t shard_end) {
  // ZeRO-Offload: this bucket's final gradients (owned part) go to the host buffer now, while the
  // reduction of later buckets, and with reduce-scatter the rest of backward, goes on.
  MasterStore& store = *u.store;
  if (u.grad_shard.defined()) {
    store.stage(u.shard_size(), shard_begin, u.grad_shard.slice(0, shard_begin, shard_end));
  } else {
    for (const zero::OwnedPiece& p : zero::owned_pieces_flat(u.owned, flat_begin, flat_end))
      store.stage(u.shard_size(), p.local_begin, u.flat_grads.slice(0, p.flat_begin, p.flat_begin + p.size));
  }
  store.bucket_staged();
}

std::vector<double> Engine::get_lr() const {
  std::vector<double> out;
  for (const auto& g : groups_) out.push_back(g.lr);
  return out;
}

at::Tensor Engine::value_source(Unit& u, const std::string& what, bool& local) {
  ZEAL_CHECK(what == "grad" || (!u.store->swapper() && u.store->master().defined()), "the fp32 master weights and optimizer state of "
             "this engine live in NVMe swap files; read them from a checkpoint (zeal.checkpoint.to_fp32_state_dict)");
  if (what == "grad") {
    local = !u.flat_grads.defined();  // stages 0, 1: the whole flat gradient; 2, 3: this rank's shard
    return local ? u.grad_shard : u.flat_grads;
  }
  local = true;  // master and state cover the owned elements (all of them below stage 1)
  if (what == "fp32") return u.store->master();
  const std::vector<std::string> names = u.optimizer->state_names();
  if (std::find(names.begin(), names.end(), what) == names.end()) {
    std::string list;
    for (const std::string& n : names) list += (list.empty() ? "" : ", ") + n;
    ZEAL_CHECK(false, "the optimizer (", u.optimizer->name(), ") has no state '", what, "'; it has ",
               list.empty() ? std::string("none yet") : list);
  }
  return u.optimizer->state(what);
}

at::Tensor Engine::full_value(size_t i, const std::string& what) {
  ZEAL_CHECK(i < params_.size(), "parameter index ", i, " out of range");
  Unit& u = unit_of(i);
  const int64_t j = static_cast<int64_t>(index_in_unit(i));
  bool local = false;
  at::Tensor source = value_source(u, what, local);
  const int64_t numel = u.layout.numels[j];
  if (!local) return source.slice(0, u.layout.offsets[j], u.layout.offsets[j] + numel).to(at::kFloat).reshape(shapes_[i]);
  at::Tensor whole = at::zeros({numel}, at::TensorOptions().dtype(at::kFloat).device(source.device()));
  for (const zero::Fragment& f : u.fragments())
    if (f.param == j) whole.slice(0, f.begin, f.end).copy_(source.slice(0, f.local, f.local + (f.end - f.begin)));
  // Each element is one rank's value plus zeros: the sum is exact.
  if (partitioned_ && u.world->size() > 1) u.all_reduce_sum(whole);
  return whole.reshape(shapes_[i]);
}

void Engine::set_full_value(size_t i, const std::string& what, const at::Tensor& value) {
  ZEAL_CHECK(i < params_.size(), "parameter index ", i, " out of range");
  ZEAL_CHECK(what != "grad", "gradients are set by backward, not set_full_value");
  Unit& u = unit_of(i);
  const int64_t j = static_cast<int64_t>(index_in_unit(i));
  ZEAL_CHECK(value.numel() == u.layout.numels[j], "parameter '", names_[i], "' has ", u.layout.numels[j],
             " elements, the value given has ", value.numel());
  bool local = false;
  at::Tensor target = value_source(u, what, local);
  const at::Tensor flat = value.detach().reshape({-1}).to(target.options());
  const std::vector<zero::Fragment> mine = u.fragments();
  for (const zero::Fragment& f : mine)
    if (f.param == j) target.slice(0, f.local, f.local + (f.end - f.begin)).copy_(flat.slice(0, f.begin, f.end));
  if (what != "fp32") return;
  if (u.partition) {
    // Stage 3 gathers the parameter from its shard: the owned chunks take the new values too.
    for (const zero::Fragment& f : mine)
      if (f.param == j)
        u.partition->write_shard(f.local, u.store->master().slice(0, f.local, f.local + (f.end - f.begin)));
    u.partition->refresh();
    return;
  }
  u.publish(u.store->master());
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
  const Unit& u = only_unit("segments");
  std::vector<std::array<int64_t, 3>> out;
  for (size_t k = 0; k < u.segments.size(); ++k)
    out.push_back({static_cast<int64_t>(u.segment_group[k]), u.segments[k].begin, u.segments[k].end});
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
