// The DeepSpeed-compatible JSON config, parsed once into typed, validated structs.
// Key names, defaults and meanings follow DeepSpeed's documentation; docs/config.md lists them.
// Every rejection is a ConfigError naming the key path, what was expected and what was given.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace zeal {

enum class Precision { kFp32, kFp16, kBf16 };
enum class OptimizerType { kAdam, kAdamW, kSgd, kLamb, kAdagrad, kOneBitAdam, kZeroOneAdam, kOneBitLamb };
enum class SchedulerType { kWarmupLR, kWarmupDecayLR, kWarmupCosineLR, kOneCycle, kLRRangeTest };
// The dtype gradients travel in; kDefault keeps the gradient dtype.
enum class CommDtype { kDefault, kFp32, kFp16, kBf16 };

struct OptimizerConfig {
  bool present = false;
  OptimizerType type = OptimizerType::kAdam;
  double lr = 1e-3;
  std::array<double, 2> betas{0.9, 0.999};
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool adam_w_mode = true;  // DeepSpeed's "Adam" is decoupled (AdamW) unless this is false
  bool bias_correction = true;
  double momentum = 0.0;  // SGD
  double dampening = 0.0;
  bool nesterov = false;
  double max_coeff = 10.0;  // Lamb: trust ratio clamp (DeepSpeed's FusedLamb defaults)
  double min_coeff = 0.01;
  double lr_decay = 0.0;    // Adagrad (torch.optim.Adagrad)
  double initial_accumulator_value = 0.0;
  int64_t freeze_step = 100000;  // OneBitAdam, OneBitLamb: steps of uncompressed warmup
  // ZeroOneAdam (DeepSpeed's names and defaults)
  int64_t var_freeze_step = 100000;  // the last step that may update the variance
  int64_t var_update_scaler = 16;    // variance updates per interval before the interval doubles
  int64_t local_step_scaler = 32678; // local steps per local-step interval before it doubles
  int64_t local_step_clipper = 16;   // the longest local-step interval
  // OneBitLamb (DeepSpeed's names and defaults)
  double coeff_beta = 0.9;       // running average of the LAMB coefficient during warmup
  double factor_max = 4.0;       // bounds of the scaling factor on the frozen coefficient
  double factor_min = 0.5;
  double factor_threshold = 0.1; // how far the factor may move in one step
  // Whether the optimizer communicates compressed (1-bit) after a warmup.
  bool compressed() const {
    return type == OptimizerType::kOneBitAdam || type == OptimizerType::kZeroOneAdam ||
           type == OptimizerType::kOneBitLamb;
  }
};

struct SchedulerConfig {
  bool present = false;
  SchedulerType type = SchedulerType::kWarmupLR;
  // WarmupLR, WarmupDecayLR
  double warmup_min_lr = 0.0;
  std::optional<double> warmup_max_lr;  // WarmupLR: the optimizer's lr when absent
  int64_t warmup_num_steps = 1000;
  bool warmup_log = true;  // warmup_type "log" (true) or "linear"
  int64_t total_num_steps = 0;
  // WarmupCosineLR
  double warmup_min_ratio = 0.0;
  double cos_min_ratio = 1e-4;
  // OneCycle
  double cycle_min_lr = 0.0;
  double cycle_max_lr = 0.0;
  double decay_lr_rate = 0.0;
  double cycle_first_step_size = 2000;
  std::optional<double> cycle_second_step_size;
  int64_t cycle_first_stair_count = 0;
  std::optional<int64_t> cycle_second_stair_count;
  double decay_step_size = 0;
  bool cycle_momentum = true;
  double cycle_min_mom = 0.8;
  double cycle_max_mom = 0.9;
  double decay_mom_rate = 0.0;
  // LRRangeTest
  double lr_range_test_min_lr = 1e-3;
  double lr_range_test_step_size = 2000;
  double lr_range_test_step_rate = 1.0;
  bool lr_range_test_staircase = false;
};

struct Fp16Config {
  bool enabled = false;
  double loss_scale = 0.0;  // 0 selects dynamic loss scaling
  int64_t initial_scale_power = 16;
  int64_t loss_scale_window = 1000;
  int64_t hysteresis = 2;
  bool consecutive_hysteresis = false;
  double min_loss_scale = 1.0;
};

// The `aio` section: how NVMe offload moves bytes (DeepSpeed's keys and defaults).
struct AioConfig {
  int64_t block_size = 1048576;  // bytes per submitted operation; a multiple of 4096 (O_DIRECT)
  int64_t queue_depth = 8;       // operations in flight per I/O thread
  int64_t thread_count = 1;      // I/O threads, each with its own ring (alias intra_op_parallelism)
  bool single_submit = false;    // submit each operation alone (true) or a batch at a time
  bool overlap_events = true;    // refill the queue as each completes (true) or per drained batch
};

enum class OffloadDevice { kNone, kCpu, kNvme };

// zero_optimization.offload_optimizer: where the fp32 master weights and optimizer state live.
struct OffloadOptimizerConfig {
  bool enabled = false;     // device "cpu" or "nvme" (device "none" or no section: off)
  OffloadDevice device = OffloadDevice::kNone;
  bool pin_memory = false;  // page-locked host buffers, when a CUDA device is present
  std::string nvme_path;    // device "nvme": the directory the swap files go under
  int64_t buffer_count = 4; // device "nvme": buffers of one sub-group (at least its tensors)
  bool pipeline_read = false;   // device "nvme": read sub-group k+1 while stepping k
  bool pipeline_write = false;  // device "nvme": write sub-group k while stepping k+1
};

// zero_optimization.offload_param (stage 3): where the partitioned parameters live.
struct OffloadParamConfig {
  OffloadDevice device = OffloadDevice::kNone;
  bool pin_memory = false;
  std::string nvme_path;          // device "nvme"
  int64_t buffer_count = 5;       // accepted (DeepSpeed's prefetch buffers); Zeal reads a chunk per gather
  int64_t buffer_size = 100000000;
  int64_t max_in_cpu = 1000000000;
};

struct ZeroConfig {
  int64_t stage = 0;
  OffloadOptimizerConfig offload_optimizer;
  OffloadParamConfig offload_param;
  int64_t reduce_bucket_size = 500000000;  // elements
  bool reduce_scatter = true;              // stage 2: reduce-scatter (true) or all-reduce the buckets
  bool overlap_comm = true;                // accepted; Zeal always overlaps reduction with backward
  bool contiguous_gradients = true;        // accepted; Zeal's gradients are always one flat buffer
  bool allgather_partitions = true;        // accepted; parameters are all-gathered per bucket
  int64_t allgather_bucket_size = 500000000;
  // Stage 3 (DeepSpeed's defaults; the stage3_-prefixed names are aliases).
  int64_t prefetch_bucket_size = 50000000;       // elements gathered ahead of use in forward
  int64_t param_persistence_threshold = 100000;  // parameters this small stay gathered
  int64_t max_live_parameters = 1000000000;      // cap on gathered elements (prefetch and reuse)
  int64_t max_reuse_distance = 1000000000;       // keep a parameter gathered if reused this soon (elements)
  int64_t model_persistence_threshold = INT64_MAX;  // accepted; no cap on persistent elements
  bool gather_16bit_weights_on_model_save = false;  // save_16bit_model gathers the full weights
  bool ignore_unused_parameters = true;          // accepted; unused parameters never hang Zeal
  int64_t sub_group_size = 1000000000;           // elements per NVMe swap file (offload_optimizer nvme)
  bool round_robin_gradients = false;            // accepted; no effect without offload
  bool elastic_checkpoint = false;               // accepted; every Zeal checkpoint reshards
  bool load_from_fp32_weights = true;
  // ZeRO++ (docs/zeropp.md). qwZ: stage 3 gathers parameters as 8-bit blocks.
  bool quantized_weights = false;
  bool quantized_nontrainable_weights = false;  // zero_quantized_nontrainable_weights: frozen chunks stored int8
  // hpZ: a secondary partition of the parameters within groups of this many ranks (a node).
  int64_t hpz_partition_size = 1;
  // qgZ: stage 3's gradient reduce-scatter as a hierarchical all-to-all of 4-bit blocks.
  bool quantized_gradients = false;
  // LoCo (zeropp_loco_param): each of qgZ's quantizations carries its error to the next reduction
  // as a moving average, error = err_beta * error + (1 - err_beta) * (what was lost), cleared every
  // reset_T reductions (Note [LoCo error feedback], engine/grad_reducer.cpp).
  // MiCS: parameters, gradients and optimizer state sharded within groups of this many ranks (the
  // mesh's data_inner axis) and replicated across the groups; -1 is off.
  int64_t mics_shard_size = -1;
  bool mics_hierarchical_params_gather = false;  // accepted: one all-gather per shard group
  struct Loco {
    bool enabled = false;
    double err_beta = 0.8;
    int64_t reset_T = 1024;
  } loco;
};

// tensorboard and csv_monitor: the training events (DeepSpeed's names) rank 0 writes under
// output_path/job_name (python/zeal/monitor.py).
struct MonitorConfig {
  bool enabled = false;
  std::string output_path;  // "" is the working directory
  std::string job_name = "DeepSpeedJobName";
};

// wandb: the same events through Weights & Biases (wandb.init(project, group, entity=team)).
struct WandbConfig {
  bool enabled = false;
  std::string team, group;  // "" is wandb's own default
  std::string project = "deepspeed";
};

// flops_profiler: rank 0 profiles the forwards of step profile_step and prints DeepSpeed's report
// (python/zeal/profiling/flops_profiler.py).
struct FlopsProfilerConfig {
  bool enabled = false;
  double recompute_fwd_factor = 0.0;
  int64_t profile_step = 1;
  int64_t module_depth = -1;
  int64_t top_modules = 1;
  bool detailed = true;
  std::string output_file;  // "" prints to stdout
};

// comms_logger: count every collective's calls and message bytes (comm/comms_logger.h).
struct CommsLoggerConfig {
  bool enabled = false;
  bool verbose = false;  // log every op as it is issued
  bool prof_all = true;  // count every op; else only prof_ops
  bool debug = false;    // accepted
  std::vector<std::string> prof_ops;
};

// The three batch numbers after DeepSpeed's rule: batch = micro * accumulation * data-parallel size.
struct BatchSizes {
  int64_t train_batch_size;
  int64_t micro_batch_size;
  int64_t gradient_accumulation_steps;
};

// The default deadline of every collective, in seconds: the one place it is written (the comm
// layer's process-wide default starts from it; comms_timeout_s overrides it).
constexpr double kDefaultCommsTimeoutS = 300.0;

struct Config {
  std::optional<int64_t> train_batch_size;
  std::optional<int64_t> train_micro_batch_size_per_gpu;
  std::optional<int64_t> gradient_accumulation_steps;
  OptimizerConfig optimizer;
  SchedulerConfig scheduler;
  Fp16Config fp16;
  bool bf16 = false;
  double gradient_clipping = 0.0;
  int64_t steps_per_print = 10;
  bool wall_clock_breakdown = false;
  ZeroConfig zero_optimization;
  AioConfig aio;
  CommsLoggerConfig comms_logger;
  MonitorConfig tensorboard, csv_monitor;
  WandbConfig wandb;
  FlopsProfilerConfig flops_profiler;
  CommDtype communication_data_type = CommDtype::kDefault;
  bool prescale_gradients = false;
  double gradient_predivide_factor = 1.0;
  // DeepSpeed's Ulysses degree: the mesh's sequence axis (zeal.sequence; ranks of one sequence group
  // are consecutive). The engine trains on a mesh with this axis; its sample ranks exclude it.
  int64_t sequence_parallel_size = 1;
  double comms_timeout_s = kDefaultCommsTimeoutS;  // Zeal's own key: every blocking collective wait is bounded by it

  static Config from_json(const nlohmann::json& json);
  static Config from_string(const std::string& text);
  // The text as JSON, strictly (no duplicate keys, NaN, NUL bytes or ill-formed UTF-8; bounded
  // depth), or ConfigError with the byte offset and key path. from_string and Python's
  // zeal.config use it, so every config takes this one path.
  static nlohmann::json parse_text(const std::string& text);
  static Config from_file(const std::string& path);

  Precision precision() const;
  // Fills in the missing batch numbers for a data-parallel size, or raises ConfigError with the
  // arithmetic when the given ones disagree.
  BatchSizes resolve_batch(int64_t data_parallel_size) const;
};

const char* to_string(OptimizerType type);
const char* to_string(SchedulerType type);
// The config's scheduler.type values, in SchedulerType's order (DeepSpeed's VALID_LR_SCHEDULES).
std::vector<std::string> scheduler_names();

}  // namespace zeal
