// The training engine: owns the flat parameter, gradient and optimizer buffers of one model
// replica and composes the parts below it. The user's parameters become views into the flat
// buffers (DESIGN.md "one state owner"); nothing else keeps a copy of training state.
//
//   backward(loss): scale loss by loss_scale / gradient_accumulation_steps, run autograd; the
//                   GradReducer reduces buckets as they fill (stages 0, 1: all-reduce on the
//                   accumulation boundary; stages 2, 3: reduce-scatter into the shard every backward).
// Stage 3 also partitions the parameters (zero/param_partition.h): the Python front end gathers
// them around each module's forward, and backward gathers them again where autograd needs them.
//   step():         on the boundary: unscale, check overflow (fp16), clip, optimizer update on the
//                   fp32 master copy, copy back to the model's dtype, advance the LR schedule and
//                   the loss scaler, zero the gradients. Between boundaries it only counts.
#pragma once

#include <array>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/checkpoint/checkpoint.h"
#include "zeal/comm/comms_logger.h"
#include "zeal/comm/communicator.h"
#include "zeal/comm/compressed.h"
#include "zeal/core/config.h"
#include "zeal/engine/grad_reducer.h"
#include "zeal/engine/precision.h"
#include "zeal/engine/unit.h"
#include "zeal/offload/optimizer_swapper.h"
#include "zeal/optim/loss_scaler.h"
#include "zeal/optim/lr_scheduler.h"
#include "zeal/optim/optimizer.h"
#include "zeal/parallel/placement.h"
#include "zeal/parallel/process_groups.h"
#include "zeal/zero/layout.h"
#include "zeal/zero/param_partition.h"

namespace zeal::engine {

// One optimizer parameter group as the user gives it; unset fields take the config's values.
struct ParamGroupSpec {
  std::vector<at::Tensor> params;
  // Optional, parallel to params: a parameter already partitioned by zero::Init arrives with an
  // empty .data, its full shape, and this rank's chunk of it (stage 3 only).
  std::vector<std::vector<int64_t>> full_shapes;
  std::vector<at::Tensor> chunks;
  std::vector<std::string> names;  // optional, parallel to params: for checkpoints and messages
  std::vector<std::vector<std::string>> aliases;  // optional, parallel to params: tied weights' other names
  // Optional, parallel to params: where a tensor-parallel slice sits in its full tensor, so that a
  // checkpoint loads at another tensor-parallel size (checkpoint.h).
  std::vector<checkpoint::TensorSplit> splits;
  // Optional, parallel to params: where each lives on the mesh (Note [Parameter placement]);
  // default replicated (a data-parallel weight).
  std::vector<parallel::Placement> placements;
  std::optional<double> lr;
  std::optional<double> weight_decay;
  std::optional<std::array<double, 2>> betas;
  std::optional<double> eps;
};

class Engine {
 public:
  // mesh: the process groups of the job (parallel/process_groups.h). From each parameter's
  // placement the engine derives the group its gradient is reduced and ZeRO-partitioned over and
  // the ranks its norm is summed across; for parameters on a CUDA device it takes that group's NCCL
  // twin. client_optimizer: the optimizer the user passed to initialize (optim/client_optimizer.h),
  // used in place of the config's optimizer section (which must then be absent).
  Engine(std::vector<ParamGroupSpec> groups, Config config, std::shared_ptr<parallel::ProcessGroups> mesh,
         std::unique_ptr<optim::Optimizer> client_optimizer = nullptr);
  // Plain data parallelism over the ranks of `world` (a host communicator): a mesh of one data axis.
  Engine(std::vector<ParamGroupSpec> groups, Config config, comm::CommunicatorPtr world,
         std::unique_ptr<optim::Optimizer> client_optimizer = nullptr);
  ~Engine();

  // Backward of loss * loss_scale / gradient_accumulation_steps; on the accumulation boundary
  // it returns with the gradients averaged over the data-parallel ranks.
  // retain_graph and scale_wrt_gas as in DeepSpeed's engine.backward: keep the autograd graph, and
  // divide the loss by gradient_accumulation_steps (true) or not.
  void backward(const at::Tensor& loss, bool retain_graph = false, bool scale_wrt_gas = true);
  // Backward from outputs whose gradients arrived from elsewhere (the next pipeline stage), already
  // scaled: the same accounting as backward(loss) (accumulation boundary, reduction), no rescaling.
  void backward_from(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& output_grads);
  void step();
  void zero_grad();

  // Micro-batch accounting (the engine is its one owner): whether the current micro-batch ends the
  // accumulation, i.e. whether step() applies. By default every micro-batch runs one backward and
  // one step() call, and the gradient_accumulation_steps-th applies.
  bool is_gradient_accumulation_boundary() const;
  // A pipeline stage runs `n` backwards (one per micro-batch and model chunk) and then one step():
  // the n-th backward ends the accumulation and the step after it applies. 0: the default rule.
  void set_backwards_per_step(int64_t n);
  // DeepSpeed's set_gradient_accumulation_boundary and no_sync, for callers that run their own
  // accumulation: 1 (a boundary), 0 (not one), -1 (back to counting).
  void set_boundary_override(int boundary) { boundary_override_ = boundary; }
  int64_t global_steps() const { return global_steps_; }
  int64_t global_samples() const { return global_samples_; }
  int64_t micro_steps() const { return micro_steps_; }
  int64_t skipped_steps() const { return skipped_steps_; }
  std::vector<double> get_lr() const;
  // Per group: what a torch LR scheduler wrote into the optimizer's param_groups (DeepSpeed's
  // optimizer reads group["lr"] at each step). A config scheduler sets them again at its next step.
  void set_lr(const std::vector<double>& lrs);
  // Per group: beta1, or the momentum for SGD (what DeepSpeed's OneCycle cycles; lr_scheduler.get_mom()).
  std::vector<double> get_mom() const;
  // Whether the schedule moves the optimizer's betas (DeepSpeed's OneCycle with cycle_momentum).
  bool cycles_momentum() const {
    return schedule_ && schedule_->beta1(0).has_value() && config_.optimizer.type != OptimizerType::kSgd;
  }
  std::vector<std::array<double, 2>> group_betas() const {
    std::vector<std::array<double, 2>> out;
    for (const optim::ParamGroup& g : groups_) out.push_back(g.betas);
    return out;
  }
  // The optimizer's segments in local (owned, fp32 master) coordinates: {group, begin, end}
  // (one unit only: a client optimizer steps them).
  std::vector<std::array<int64_t, 3>> segments() const;
  double loss_scale() const { return precision_.loss_scale(); }
  bool dynamic_loss_scale() const { return precision_.dynamic(); }
  bool last_step_overflow() const { return last_step_overflow_; }  // the last boundary step was skipped
  double last_grad_norm() const { return last_grad_norm_; }
  // Whether a step computes the global gradient norm: fp16 (its overflow check) or clipping need it.
  bool computes_grad_norm() const { return precision_.computes_grad_norm(); }
  const BatchSizes& batch() const { return batch_; }
  const Config& config() const { return config_; }
  // The data-parallel group of the batch: the largest unit's reduction group (the dense weights').
  const comm::CommunicatorPtr& world() const { return primary().world; }
  const std::shared_ptr<parallel::ProcessGroups>& mesh() const { return mesh_; }
  const std::vector<std::string>& reduction_axes() const { return primary().axes; }
  // The sharded-state units (Note [Sharded-state units]), one per reduction group, in the order
  // their first parameters appear; and which unit holds parameter i, at which unit index.
  const std::vector<std::unique_ptr<Unit>>& units() const { return units_; }
  Unit& unit_of(size_t i) { return *units_[unit_of_.at(i)]; }
  size_t index_in_unit(size_t i) const { return index_in_unit_.at(i); }
  at::ScalarType model_dtype() const { return model_dtype_; }
  size_t num_buckets() const;
  int64_t stage() const { return stage_; }
  int64_t flat_numel() const;    // padded flat buffers, every rank (all units)
  int64_t master_numel() const;  // fp32 master weights on this rank (all units)
  // Where the master weights live: a device name, or "nvme" when they are swapped to files.
  std::string master_location() const { return units_.front()->store->location(); }
  // The optimizer: every unit runs one of the same kind and settings, stepped together; this is the
  // first unit's (its name, steps and state names are every unit's).
  optim::Optimizer& optimizer() { return *units_.front()->optimizer; }
  int64_t grad_shard_numel() const;
  // comms_logger: calls and message bytes per op since the engine was made (empty when off).
  std::map<std::string, comm::OpCount> comms_counts() const;
  // Communication rounds the optimizer skipped (0/1 Adam's local steps).
  int64_t skipped_comm_rounds() const;
  // Bytes of training state this rank holds now, by role: params, grads, master, optimizer.
  std::vector<std::pair<std::string, int64_t>> state_bytes() const;

  // The trainable parameters the engine manages, in its index order, with their names and full shapes.
  const std::vector<at::Tensor>& parameters() const { return params_; }
  const std::vector<std::string>& parameter_names() const { return names_; }
  const std::vector<std::vector<int64_t>>& parameter_shapes() const { return shapes_; }
  // Stage 3 with one unit: the frozen parameters (requires_grad false) it partitions too (Note
  // [Frozen parameters], zero/param_partition.h), engine indices parameters().size() and up; none
  // below stage 3 or with several units (they stay whole on every rank).
  const std::vector<at::Tensor>& frozen_parameters() const { return frozen_params_; }
  const std::vector<std::string>& frozen_parameter_names() const { return frozen_names_; }
  const std::vector<std::vector<int64_t>>& frozen_parameter_shapes() const { return frozen_shapes_; }
  // Stage 3: the partition holding engine index i (trainable or frozen) and i's index there.
  std::pair<zero::ParamPartition*, size_t> stage3_slot(size_t i);
  // The inverse: the engine index of a unit partition's index j.
  size_t engine_index(const Unit& u, size_t j) const;
  // Stage 3 (else null): the partition of a one-unit engine; with several units, each unit's
  // (unit_of / index_in_unit route a parameter to it).
  zero::ParamPartition* partition() { return units_.size() == 1 ? units_.front()->partition.get() : nullptr; }
  // This rank's fragment table (zero/layout.h) and the shard buffers it indexes (one unit only).
  std::vector<zero::Fragment> fragments() const { return only_unit("fragments").fragments(); }
  const at::Tensor& grad_shard() const { return only_unit("grad_shard").grad_shard; }
  const at::Tensor& master() const { return only_unit("master").store->master(); }
  // ZeRO debugging (DeepSpeed's safe_get_full_grad / _fp32_param / _optimizer_state): parameter i's
  // whole `what` as fp32 of its shape, on every rank. what: "grad" (the reduced gradient, between
  // backward on the accumulation boundary and step), "fp32" (the master weights) or an optimizer
  // state name. Collective over the data-parallel ranks when the value is partitioned.
  at::Tensor full_value(size_t i, const std::string& what);
  // The inverse for "fp32" and state names: every rank passes the same whole value and keeps its
  // owned part; "fp32" also updates the model's parameter (collective, as publishing is).
  void set_full_value(size_t i, const std::string& what, const at::Tensor& value);
  // Stage 3: a live parameter's value was changed alike on every rank; take it into shard and master.
  void absorb_parameter(size_t i);

  // Checkpoints (checkpoint/checkpoint.h, Note [Atomic checkpoints]). Collective: every rank calls.
  // save returns the checkpoint directory; `extra` is module state the engine does not own
  // (buffers, frozen parameters), written by rank 0. load returns (directory, client_state JSON).
  std::string save_checkpoint(const std::string& save_dir, const std::string& tag, const std::string& client_state_json,
                              const std::vector<std::pair<std::string, at::Tensor>>& extra, bool save_latest = true);
  // One part of a checkpoint in parts (a pipeline stage, a tensor rank): this engine's data group
  // saves <tag>/<part> and `everyone` (the ranks of every part) publishes <tag> with parts.json
  // naming `parts` in order and recording `layout_json` (the parallel sizes). Collective over
  // `everyone`; the same protocol as save_checkpoint (checkpoint/publish.h).
  std::string save_checkpoint_part(const comm::CommunicatorPtr& everyone, const std::string& save_dir,
                                   const std::string& tag, const std::string& part,
                                   const std::vector<std::string>& parts, const std::string& layout_json,
                                   const std::string& client_state_json,
                                   const std::vector<std::pair<std::string, at::Tensor>>& extra, bool save_latest = true);
  std::pair<std::string, std::string> load_checkpoint(const std::string& load_dir, const std::string& tag,
                                                      bool load_optimizer_states, bool load_lr_scheduler_states,
                                                      bool load_module_only);
  // The same from the parts of one checkpoint (pipeline stages, each saved by its own engine): each
  // parameter is looked up by name in the parts in order.
  std::pair<std::string, std::string> load_checkpoint_parts(const std::vector<std::string>& dirs,
                                                            bool load_optimizer_states, bool load_lr_scheduler_states,
                                                            bool load_module_only);
  // Tests inject crashes here: called with "shard_half" mid-write of a shard, "before_publish" on
  // rank 0 just before the directory rename.
  void set_checkpoint_fault_hook(std::function<void(const std::string&)> hook) { fault_hook_ = std::move(hook); }

  // Time the caller spent in forward, for wall_clock_breakdown.
  void add_forward_time(double seconds) {
    forward_seconds_ += seconds;
    pending_step_.forward_ms += seconds * 1e3;
  }
  // What the latest applied-or-skipped step took: the mean of the losses backward got since the
  // step before, and the forward / backward / step times (ms) summed over its micro-batches. The
  // monitors (python/zeal/monitor.py) write these as DeepSpeed's Train/Samples events.
  struct StepRecord {
    double loss = 0.0;
    int64_t losses = 0;
    double forward_ms = 0.0, backward_ms = 0.0, step_ms = 0.0;
  };
  const StepRecord& last_step_record() const { return last_step_; }

 private:
  // The load itself, agreed across ranks; `locate` names the directories (it may throw: a missing
  // tag fails every rank alike).
  std::pair<std::string, std::string> load_parts(const std::function<std::vector<std::string>()>& locate,
                                                 bool load_optimizer_states, bool load_lr_scheduler_states,
                                                 bool load_module_only);
  std::pair<std::string, std::string> load_checkpoint_local(const std::vector<std::string>& dirs,
                                                            bool load_optimizer_states, bool load_lr_scheduler_states,
                                                            bool load_module_only);
  // One unit's checkpoint: <save_dir>/<tag> saved by the unit's group (Note [Checkpoints of several units]).
  std::string save_unit(Unit& u, const std::string& save_dir, const std::string& tag, const std::string& client_json,
                        const std::vector<std::pair<std::string, at::Tensor>>& extra, bool save_latest);
  // The part a unit's group saves: "unit<k>_<axes>_<group index>" (the same on every rank of the group).
  std::string unit_part_name(size_t k, int group_index) const;
  // From the parameters' placements: the units, each with its reduction group, and the parameters in them.
  void make_units(const std::vector<parallel::Placement>& placements);
  // group, wrapped to count its ops when comms_logger is on (axes: the mesh axes it spans).
  comm::CommunicatorPtr counted(comm::CommunicatorPtr group, const std::vector<std::string>& axes) const;
  // One unit's flat buffers, master weights, optimizer, reducer and partition.
  void build_unit(Unit& u, const std::vector<at::Tensor>& given_chunks, const std::vector<size_t>& group_of_param,
                  std::unique_ptr<optim::Optimizer> client_optimizer, zero::FrozenParams frozen);
  void init_stage3(Unit& u, const std::vector<at::Tensor>& given_chunks, const at::TensorOptions& options,
                   bool with_master);
  const Unit& primary() const { return *units_[primary_]; }
  Unit& only_unit(const char* what) const;  // the one unit, or an error naming `what`
  bool next_backward_is_boundary() const;  // the rule as run_backward needs it (before counting)
  void apply_lr(int64_t iteration);
  void log_step();
  // This unit's gradients for the step, in fp32 (staged on the host with offload).
  at::Tensor step_gradients(Unit& u, bool flat_step);
  void run_backward(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& output_grads,
                    bool retain_graph = false);
  // The local tensor of unit u holding `what` (full_value) and whether it is in local (owned) coordinates.
  at::Tensor value_source(Unit& u, const std::string& what, bool& local);
  // ZeRO-Offload: a bucket's final gradients (owned part) to the master store's host buffer.
  void stage_bucket_on_host(Unit& u, int64_t flat_begin, int64_t flat_end, int64_t shard_begin, int64_t shard_end);

  Config config_;
  std::shared_ptr<parallel::ProcessGroups> mesh_;
  int boundary_override_ = -1;               // set_boundary_override
  int64_t backwards_per_step_ = 0;           // set_backwards_per_step
  int64_t backwards_in_step_ = 0;            // backwards since the last applied step (pipeline)
  BatchSizes batch_;
  at::ScalarType model_dtype_;
  at::Device device_{at::kCPU};
  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> frozen_params_;  // Note [Frozen parameters]
  std::vector<std::string> frozen_names_;
  std::vector<std::vector<int64_t>> frozen_shapes_;
  std::vector<std::vector<int64_t>> shapes_;
  std::vector<checkpoint::TensorSplit> splits_;  // parallel to names_
  std::vector<std::vector<std::string>> aliases_;  // parallel to names_ (ParamGroupSpec::aliases)
  int64_t stage_ = 0;
  bool partitioned_ = false;  // ZeRO stage >= 1: master weights and optimizer state cover owned chunks
  std::vector<std::unique_ptr<Unit>> units_;  // Note [Sharded-state units]
  size_t primary_ = 0;                        // the unit with the largest reduction group
  std::vector<size_t> unit_of_, index_in_unit_;  // parallel to params_
  std::vector<optim::ParamGroup> groups_;     // the user's groups (lr, betas, ...)
  std::vector<double> base_lrs_;
  std::unique_ptr<optim::LrSchedule> schedule_;
  PrecisionPolicy precision_;  // unscale, norm, overflow, clipping, loss scale
  std::function<void(const std::string&)> fault_hook_;

  int64_t micro_steps_ = 0;
  int64_t global_steps_ = 0;
  int64_t global_samples_ = 0;
  int64_t skipped_steps_ = 0;
  int64_t scheduler_iteration_ = -1;
  double last_grad_norm_ = 0.0;
  bool last_step_overflow_ = false;

  // logging
  double loss_sum_ = 0.0;
  int64_t loss_count_ = 0;
  double forward_seconds_ = 0.0, backward_seconds_ = 0.0, step_seconds_ = 0.0;
  StepRecord pending_step_, last_step_;
  std::chrono::steady_clock::time_point last_log_time_;
  int64_t last_log_samples_ = 0;
};

}  // namespace zeal::engine
