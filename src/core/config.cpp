// Config parsing. A small Reader walks one JSON object at a time, checking each key's type and
// range and remembering which keys were read, so the leftovers can be reported as unknown (with a
// did-you-mean) or as "not supported yet" when they belong to a later Zeal feature.
#include "zeal/core/config.h"

#include <algorithm>
#include <climits>
#include <limits>
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "zeal/core/error.h"
#include "zeal/core/json.h"
#include "zeal/core/logging.h"

namespace zeal {
namespace {

using json = nlohmann::json;

// Short and bounded whatever the value (json_preview never dumps a huge or deep value whole).
std::string show(const json& value) {
  // Hugging Face's placeholder: the Trainer and Accelerate replace it before DeepSpeed (or Zeal)
  // sees the config, so one that arrives here was never filled (docs/huggingface.md).
  if (value.is_string() && value.get<std::string>() == "auto")
    return "\"auto\" (a placeholder the Hugging Face Trainer or Accelerate fills in from their own "
           "arguments; this key reached Zeal unfilled: give it a value, or let the Trainer/Accelerate "
           "prepare the config)";
  return json_preview(value) + " (" + value.type_name() + ")";
}

// A key for a message: at most 80 bytes, cut on a UTF-8 boundary.
std::string clip_key(const std::string& key) {
  if (key.size() <= 80) return key;
  size_t cut = 80;
  while (cut > 0 && (static_cast<unsigned char>(key[cut]) & 0xC0) == 0x80) --cut;
  return key.substr(0, cut) + "... (" + std::to_string(key.size()) + " bytes)";
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      size_t cost = std::tolower(a[i - 1]) == std::tolower(b[j - 1]) ? 0 : 1;
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + cost});
      diagonal = above;
    }
  }
  return row[b.size()];
}

bool iequals(const std::string& a, const std::string& b) {
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) { return std::tolower(x) == std::tolower(y); });
}

std::string did_you_mean(const std::string& key, const std::vector<std::string>& candidates) {
  // No known key is longer than ~45 characters: a longer one is no typo of any, and the edit
  // distance (quadratic) of a megabyte key would take seconds.
  if (key.size() > 64) return "";
  std::string best;
  size_t best_distance = std::max<size_t>(2, key.size() / 3) + 1;
  for (const auto& candidate : candidates) {
    // A key that is the start of a real one ("train_micro_batch_size") most likely meant it.
    bool prefix = key.size() >= 4 && candidate.size() > key.size() && iequals(candidate.substr(0, key.size()), key);
    size_t d = prefix ? 0 : edit_distance(key, candidate);
    if (d < best_distance) {
      best_distance = d;
      best = candidate;
    }
  }
  return best.empty() ? "" : "; did you mean '" + best + "'?";
}

std::string join_path(const std::string& path, const std::string& key) {
  return path.empty() ? key : path + "." + key;
}

// Reads the keys of one JSON object under a dotted path.
class Reader {
 public:
  Reader(const json& object, std::string path) : object_(object), path_(std::move(path)) {
    if (!object_.is_object())
      throw ConfigError("config key '" + path_ + "': expected an object, got " + show(object_));
  }

  bool has(const std::string& key) {
    known_.push_back(key);
    return object_.contains(key) && !object_.at(key).is_null();
  }

  const json& raw(const std::string& key) { return object_.at(key); }
  const json* raw_or_null(const std::string& key) const {
    auto it = object_.find(key);
    return it == object_.end() ? nullptr : &*it;
  }
  std::string path(const std::string& key) const { return join_path(path_, key); }

  void read_bool(const std::string& key, bool& out) {
    if (!has(key)) return;
    const json& v = raw(key);
    if (!v.is_boolean()) fail(key, "a boolean (true or false)", v);
    out = v.get<bool>();
  }

  // A string; null keeps the default (DeepSpeed's Optional[str] keys).
  void read_string(const std::string& key, std::string& out) {
    if (!has(key) || raw(key).is_null()) return;
    const json& v = raw(key);
    if (!v.is_string()) fail(key, "a string", v);
    out = v.get<std::string>();
  }

  void read_int(const std::string& key, int64_t& out, int64_t min_value) {
    if (!has(key)) return;
    out = to_int(key, raw(key), min_value);
  }

  void read_int(const std::string& key, std::optional<int64_t>& out, int64_t min_value) {
    if (!has(key)) return;
    out = to_int(key, raw(key), min_value);
  }

  // A number in [min_value, inf) or (min_value, inf) when exclusive.
  void read_number(const std::string& key, double& out, double min_value, bool exclusive = false) {
    if (!has(key)) return;
    out = to_number(key, raw(key), min_value, exclusive);
  }

  void read_number(const std::string& key, std::optional<double>& out, double min_value,
                   bool exclusive = false) {
    if (!has(key)) return;
    out = to_number(key, raw(key), min_value, exclusive);
  }

  std::string read_choice(const std::string& key, const std::vector<std::string>& choices,
                          const std::string& fallback, bool case_insensitive = false) {
    if (!has(key)) return fallback;
    const json& v = raw(key);
    if (v.is_string()) {
      std::string given = v.get<std::string>();
      for (const auto& choice : choices) {
        bool same = case_insensitive ? iequals(given, choice) : given == choice;
        if (same) return choice;
      }
    }
    std::string list;
    for (const auto& choice : choices) list += (list.empty() ? "\"" : ", \"") + choice + "\"";
    std::string hint = v.is_string() ? did_you_mean(v.get<std::string>(), choices) : "";
    throw ConfigError("config key '" + path(key) + "': expected one of " + list + ", got " + show(v) + hint);
  }

  // Keys this Zeal version knows DeepSpeed has but does not implement yet.
  void reject_not_yet(const std::vector<std::string>& keys, const std::string& when) {
    for (const auto& key : keys) {
      known_.push_back(key);
      if (object_.contains(key))
        throw ConfigError("config key '" + path(key) + "' is not supported yet" + when +
                          "; remove it to run with this Zeal version");
    }
  }

  // The top level, as DeepSpeed's: a key it does not know is ignored with a warning, unless it is
  // a likely typo of a known key (then it is an error with the did-you-mean).
  void finish_top_level() {
    for (auto it = object_.begin(); it != object_.end(); ++it) {
      if (std::find(known_.begin(), known_.end(), it.key()) != known_.end()) continue;
      std::string hint = did_you_mean(it.key(), known_);
      if (!hint.empty()) throw ConfigError("unknown config key '" + clip_key(it.key()) + "'" + hint);
      log("config", LogLevel::kWarn, "config key '", clip_key(it.key()),
          "' is not a DeepSpeed or Zeal key; ignored (as DeepSpeed ignores unknown top-level keys)");
    }
  }

  // A section for a DeepSpeed feature this Zeal does not implement: accepted while switched off
  // (absent, false, null, or "enabled": false), "not supported yet" when on. `on_when_present`:
  // sections DeepSpeed switches on by being there (no "enabled" key).
  void feature_off(const std::string& key, bool on_when_present = false) {
    if (!has(key)) return;
    const json& v = raw(key);
    if (v.is_boolean() && !v.get<bool>()) return;
    if (v.is_object() && !on_when_present) {
      const auto e = v.find("enabled");
      if (e == v.end() || e->is_null()) return;
      if (!e->is_boolean()) fail(key + ".enabled", "a boolean (true or false)", *e);
      if (!e->get<bool>()) return;
      throw ConfigError("config key '" + path(key) + ".enabled': " + key +
                        " is not supported yet; set it to false or remove the section to run with this Zeal version");
    }
    throw ConfigError("config key '" + path(key) + "': " + key +
                      " is not supported yet; remove it to run with this Zeal version");
  }

  // A key DeepSpeed has whose `value_off` (its default or an off value) Zeal matches; any other
  // value is "not supported yet".
  void only_value(const std::string& key, const json& value_off, const std::string& what = "") {
    if (!has(key)) return;
    if (raw(key) == value_off) return;
    throw ConfigError("config key '" + path(key) + "': " + json_preview(value_off) + " is what this Zeal version " +
                      "supports, got " + show(raw(key)) + (what.empty() ? "" : " (" + what + ")"));
  }

  // Keys accepted with any value of the right kind: they tune what Zeal does another way or not at all.
  void accept_bool(const std::vector<std::string>& keys) {
    for (const auto& key : keys) {
      bool ignored = false;
      read_bool(key, ignored);
    }
  }
  void accept_any(const std::vector<std::string>& keys) {
    for (const auto& key : keys) (void)has(key);
  }

  // Any key never asked for is unknown.
  void finish() {
    for (auto it = object_.begin(); it != object_.end(); ++it) {
      if (std::find(known_.begin(), known_.end(), it.key()) != known_.end()) continue;
      throw ConfigError("unknown config key '" + path(clip_key(it.key())) + "'" + did_you_mean(it.key(), known_));
    }
  }

  [[noreturn]] void fail(const std::string& key, const std::string& expected, const json& given) {
    throw ConfigError("config key '" + path(key) + "': expected " + expected + ", got " + show(given));
  }

 private:
  int64_t to_int(const std::string& key, const json& v, int64_t min_value) {
    // The real limit: a 64-bit signed integer.
    std::string expected = "an integer >= " + std::to_string(min_value) + " (at most 9223372036854775807)";
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) fail(key, expected, v);
    if (v.is_number_integer()) {
      int64_t value = v.get<int64_t>();
      if (value < min_value) fail(key, expected, v);
      return value;
    }
    // DeepSpeed configs often write sizes as 5e8: accept a float that holds an integer.
    if (v.is_number_float()) {
      double value = v.get<double>();
      if (std::isfinite(value) && std::floor(value) == value && value >= static_cast<double>(min_value) &&
          value < 0x1p63)
        return static_cast<int64_t>(value);
    }
    fail(key, expected, v);
  }

  double to_number(const std::string& key, const json& v, double min_value, bool exclusive) {
    std::ostringstream expected;
    expected << "a number " << (exclusive ? "> " : ">= ") << min_value;
    if (!v.is_number()) fail(key, expected.str(), v);
    double value = v.get<double>();
    if (!std::isfinite(value) || value < min_value || (exclusive && value == min_value))
      fail(key, expected.str(), v);
    return value;
  }

  const json& object_;
  std::string path_;
  std::vector<std::string> known_;
};

void parse_optimizer(const json& node, OptimizerConfig& out) {
  Reader r(node, "optimizer");
  out.present = true;
  if (!r.has("type")) throw ConfigError("config key 'optimizer.type': expected a string naming the optimizer, got nothing");
  // DeepSpeed matches optimizer names case-insensitively.
  static const std::vector<std::string> later = {"Lion", "MuAdam", "MuAdamW", "MuSGD", "AdamW8bit"};
  if (r.raw("type").is_string()) {
    std::string given = r.raw("type").get<std::string>();
    for (const auto& name : later)
      if (iequals(given, name))
        throw ConfigError("config key 'optimizer.type': \"" + given +
                          "\" is not supported yet; this Zeal version has Adam, AdamW, SGD, Lamb, Adagrad, OneBitAdam, ZeroOneAdam and OneBitLamb");
  }
  std::string type = r.read_choice("type", {"Adam", "AdamW", "SGD", "Lamb", "Adagrad", "OneBitAdam", "ZeroOneAdam",
                                            "OneBitLamb"},
                                   "Adam", /*case_insensitive=*/true);
  out.type = type == "Adam"         ? OptimizerType::kAdam
             : type == "AdamW"      ? OptimizerType::kAdamW
             : type == "SGD"        ? OptimizerType::kSgd
             : type == "Lamb"       ? OptimizerType::kLamb
             : type == "OneBitAdam"  ? OptimizerType::kOneBitAdam
             : type == "ZeroOneAdam" ? OptimizerType::kZeroOneAdam
             : type == "OneBitLamb"  ? OptimizerType::kOneBitLamb
                                     : OptimizerType::kAdagrad;
  if (out.type == OptimizerType::kAdagrad) {  // torch.optim.Adagrad's defaults, as DeepSpeed passes params on
    out.lr = 1e-2;
    out.eps = 1e-10;
  }
  if (r.has("params")) {
    Reader p(r.raw("params"), "optimizer.params");
    p.read_number("lr", out.lr, 0.0);
    p.read_number("weight_decay", out.weight_decay, 0.0);
    if (out.type == OptimizerType::kSgd) {
      p.read_number("momentum", out.momentum, 0.0);
      p.read_number("dampening", out.dampening, 0.0);
      p.read_bool("nesterov", out.nesterov);
      if (out.nesterov && (out.momentum <= 0.0 || out.dampening != 0.0))
        throw ConfigError("config key 'optimizer.params.nesterov': nesterov needs momentum > 0 and dampening 0, got momentum " +
                          std::to_string(out.momentum) + " and dampening " + std::to_string(out.dampening));
    } else if (out.type == OptimizerType::kAdagrad) {
      p.read_number("eps", out.eps, 0.0);
      p.read_number("lr_decay", out.lr_decay, 0.0);
      p.read_number("initial_accumulator_value", out.initial_accumulator_value, 0.0);
    } else {
      if (p.has("betas")) {
        const json& b = p.raw("betas");
        bool ok = b.is_array() && b.size() == 2 && b[0].is_number() && b[1].is_number();
        if (ok) {
          out.betas = {b[0].get<double>(), b[1].get<double>()};
          ok = out.betas[0] >= 0 && out.betas[0] < 1 && out.betas[1] >= 0 && out.betas[1] < 1;
        }
        if (!ok) p.fail("betas", "a list of two numbers in [0, 1)", b);
      }
      p.read_number("eps", out.eps, 0.0, /*exclusive=*/true);
      p.read_bool("bias_correction", out.bias_correction);
      if (out.type == OptimizerType::kAdam) p.read_bool("adam_w_mode", out.adam_w_mode);
      if (out.type == OptimizerType::kAdamW) {  // DeepSpeed's AdamW is decoupled whatever adam_w_mode says
        bool ignored = true;
        p.read_bool("adam_w_mode", ignored);
      }
      if (out.compressed()) {
        if (out.type == OptimizerType::kZeroOneAdam) {
          p.read_int("var_freeze_step", out.var_freeze_step, 1);
          p.read_int("var_update_scaler", out.var_update_scaler, 1);
          p.read_int("local_step_scaler", out.local_step_scaler, 1);
          p.read_int("local_step_clipper", out.local_step_clipper, 1);
        } else {
          p.read_int("freeze_step", out.freeze_step, 1);
        }
        bool cuda_aware = false;  // accepted: Zeal's communicator moves device tensors itself
        p.read_bool("cuda_aware", cuda_aware);
        p.read_choice("comm_backend_name", {"nccl", "mpi", "compressed", "hccl"}, "nccl");  // accepted: the engine's backend is used
        bool eps_inside_sqrt = false;
        p.read_bool("eps_inside_sqrt", eps_inside_sqrt);
        if (eps_inside_sqrt)
          throw ConfigError("config key 'optimizer.params.eps_inside_sqrt': true is not supported (eps is added to the "
                            "square root, DeepSpeed's default)");
      }
      if (out.type == OptimizerType::kOneBitLamb) {
        p.read_number("coeff_beta", out.coeff_beta, 0.0);
        p.read_number("factor_max", out.factor_max, 0.0);
        p.read_number("factor_min", out.factor_min, 0.0);
        p.read_number("factor_threshold", out.factor_threshold, 0.0);
        if (out.coeff_beta >= 1.0)
          throw ConfigError("config key 'optimizer.params.coeff_beta': expected a number in [0, 1), got " +
                            std::to_string(out.coeff_beta));
        if (out.factor_max < out.factor_min)
          throw ConfigError("config key 'optimizer.params.factor_max': expected a number >= factor_min (" +
                            std::to_string(out.factor_min) + "), got " + std::to_string(out.factor_max));
      }
      if (out.type == OptimizerType::kLamb || out.type == OptimizerType::kOneBitLamb) {
        p.read_number("min_coeff", out.min_coeff, 0.0);
        p.read_number("max_coeff", out.max_coeff, 0.0);
        if (out.max_coeff < out.min_coeff)
          throw ConfigError("config key 'optimizer.params.max_coeff': expected a number >= min_coeff (" +
                            std::to_string(out.min_coeff) + "), got " + std::to_string(out.max_coeff));
        double max_grad_norm = 0.0;  // FusedLamb's own clipping; DeepSpeed users clip with gradient_clipping
        p.read_number("max_grad_norm", max_grad_norm, 0.0);
        if (max_grad_norm > 0.0)
          throw ConfigError("config key 'optimizer.params.max_grad_norm': values > 0 are not supported; use the "
                            "top-level 'gradient_clipping' key");
      } else {
        bool torch_adam = false;
        p.read_bool("torch_adam", torch_adam);  // accepted: Zeal has one Adam implementation
        if (p.has("max_grad_norm"))  // DeepSpeed refuses it the same way
          throw ConfigError("config key 'optimizer.params.max_grad_norm': not an optimizer parameter; clip with the "
                            "top-level 'gradient_clipping' key");
      }
      bool amsgrad = false;
      p.read_bool("amsgrad", amsgrad);
      if (amsgrad) throw ConfigError("config key 'optimizer.params.amsgrad': true is not supported yet");
    }
    p.finish();
  }
  r.finish();
}

void parse_scheduler(const json& node, SchedulerConfig& out) {
  Reader r(node, "scheduler");
  out.present = true;
  if (!r.has("type")) throw ConfigError("config key 'scheduler.type': expected a string naming the scheduler, got nothing");
  std::string type = r.read_choice("type", scheduler_names(), "");
  out.type = type == "WarmupLR"         ? SchedulerType::kWarmupLR
             : type == "WarmupDecayLR"  ? SchedulerType::kWarmupDecayLR
             : type == "WarmupCosineLR" ? SchedulerType::kWarmupCosineLR
             : type == "OneCycle"       ? SchedulerType::kOneCycle
                                        : SchedulerType::kLRRangeTest;
  json empty = json::object();
  Reader p(r.has("params") ? r.raw("params") : empty, "scheduler.params");
  int64_t last_batch_iteration = -1;
  p.read_int("last_batch_iteration", last_batch_iteration, -1);
  if (last_batch_iteration != -1)
    throw ConfigError("config key 'scheduler.params.last_batch_iteration': only -1 is supported (resume comes with checkpoints)");
  switch (out.type) {
    case SchedulerType::kWarmupLR:
    case SchedulerType::kWarmupDecayLR:
    case SchedulerType::kWarmupCosineLR: {
      // DeepSpeed reads 0 and 1 as 2 (the log warmup needs log(n) > 0); null is an error there too.
      if (const json* w = p.raw_or_null("warmup_num_steps"); w && w->is_null())
        throw ConfigError("config key 'scheduler.params.warmup_num_steps': expected an integer >= 0, got null");
      p.read_int("warmup_num_steps", out.warmup_num_steps, 0);
      out.warmup_log = p.read_choice("warmup_type", {"log", "linear"}, "log") == "log";
      if (out.type == SchedulerType::kWarmupCosineLR) {
        p.read_number("warmup_min_ratio", out.warmup_min_ratio, 0.0);
        p.read_number("cos_min_ratio", out.cos_min_ratio, 0.0);
      } else {
        p.read_number("warmup_min_lr", out.warmup_min_lr, 0.0);
        p.read_number("warmup_max_lr", out.warmup_max_lr, 0.0);
        if (out.type == SchedulerType::kWarmupDecayLR && !out.warmup_max_lr) out.warmup_max_lr = 1e-3;
      }
      if (out.type != SchedulerType::kWarmupLR) {
        if (!p.has("total_num_steps"))
          throw ConfigError("config key 'scheduler.params.total_num_steps': expected an integer >= 1 for " + type + ", got nothing");
        p.read_int("total_num_steps", out.total_num_steps, 1);
      }
      break;
    }
    case SchedulerType::kOneCycle: {
      for (const char* key : {"cycle_min_lr", "cycle_max_lr"})
        if (!p.has(key))
          throw ConfigError(std::string("config key 'scheduler.params.") + key + "': expected a number >= 0 for OneCycle, got nothing");
      p.read_number("cycle_min_lr", out.cycle_min_lr, 0.0);
      p.read_number("cycle_max_lr", out.cycle_max_lr, 0.0);
      p.read_number("decay_lr_rate", out.decay_lr_rate, 0.0);
      p.read_number("cycle_first_step_size", out.cycle_first_step_size, 0.0, true);
      p.read_number("cycle_second_step_size", out.cycle_second_step_size, 0.0);  // 0: the lr only rises
      p.read_int("cycle_first_stair_count", out.cycle_first_stair_count, 0);
      p.read_int("cycle_second_stair_count", out.cycle_second_stair_count, 0);
      p.read_number("decay_step_size", out.decay_step_size, 0.0);
      p.read_bool("cycle_momentum", out.cycle_momentum);
      p.read_number("cycle_min_mom", out.cycle_min_mom, 0.0);
      p.read_number("cycle_max_mom", out.cycle_max_mom, 0.0);
      p.read_number("decay_mom_rate", out.decay_mom_rate, 0.0);
      break;
    }
    case SchedulerType::kLRRangeTest: {
      p.read_number("lr_range_test_min_lr", out.lr_range_test_min_lr, 0.0);
      p.read_number("lr_range_test_step_size", out.lr_range_test_step_size, 0.0, true);
      p.read_number("lr_range_test_step_rate", out.lr_range_test_step_rate, 0.0);
      p.read_bool("lr_range_test_staircase", out.lr_range_test_staircase);
      break;
    }
  }
  p.finish();
  r.finish();
}

void parse_fp16(const json& node, Fp16Config& out) {
  Reader r(node, "fp16");
  r.read_bool("enabled", out.enabled);
  r.read_number("loss_scale", out.loss_scale, 0.0);
  r.read_int("initial_scale_power", out.initial_scale_power, 0);
  r.read_int("loss_scale_window", out.loss_scale_window, 1);
  r.read_int("hysteresis", out.hysteresis, 1);
  r.read_bool("consecutive_hysteresis", out.consecutive_hysteresis);
  r.read_number("min_loss_scale", out.min_loss_scale, 0.0, true);
  if (out.initial_scale_power > 64)
    r.fail("initial_scale_power", "an integer in [0, 64]", r.raw("initial_scale_power"));
  r.accept_bool({"auto_cast"});  // zeal.engine casts forward's floating inputs to fp16
  r.only_value("fp16_master_weights_and_grads", false, "Zeal keeps fp32 master weights");
  r.finish();
}

// The `device` and `nvme_path` keys that offload_optimizer and offload_param share.
OffloadDevice read_offload_device(Reader& o) {
  const std::string device = o.read_choice("device", {"none", "cpu", "nvme"}, "none", /*case_insensitive=*/true);
  return device == "cpu" ? OffloadDevice::kCpu : device == "nvme" ? OffloadDevice::kNvme : OffloadDevice::kNone;
}

std::string read_nvme_path(Reader& o, OffloadDevice device) {
  std::string path;
  if (o.has("nvme_path")) {
    if (!o.raw("nvme_path").is_string() || o.raw("nvme_path").get<std::string>().empty())
      o.fail("nvme_path", "a directory path (string)", o.raw("nvme_path"));
    path = o.raw("nvme_path").get<std::string>();
  }
  if (device == OffloadDevice::kNvme && path.empty())
    throw ConfigError("config key '" + o.path("nvme_path") + "': device \"nvme\" needs nvme_path, the directory "
                      "for the swap files; got nothing");
  return path;
}

void parse_zero(const json& given, ZeroConfig& out) {
  // DeepSpeed's legacy forms: "zero_optimization": true (stage 1) or false; cpu_offload and
  // cpu_offload_param, its old names for offload_optimizer and offload_param with device "cpu".
  json node = given.is_boolean() ? json{{"stage", given.get<bool>() ? 1 : 0}} : given;
  if (node.is_object()) {
    for (const auto& [legacy, modern] : {std::pair<std::string, std::string>{"cpu_offload", "offload_optimizer"},
                                         {"cpu_offload_param", "offload_param"}}) {
      auto it = node.find(legacy);
      if (it == node.end() || it->is_null()) continue;
      if (!it->is_boolean())
        throw ConfigError("config key 'zero_optimization." + legacy + "': expected a boolean (true or false), got " +
                          show(*it));
      const bool on = it->get<bool>();
      if (on && node.contains(modern) && !node.at(modern).is_null())
        throw ConfigError("config keys 'zero_optimization." + legacy + "' and 'zero_optimization." + modern +
                          "' are both set; " + legacy + " is DeepSpeed's old name for " + modern +
                          " with device \"cpu\": keep " + modern);
      if (on) node[modern] = json{{"device", "cpu"}};
    }
  }
  Reader r(node, "zero_optimization");
  r.accept_bool({"cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory"});  // folded in above
  r.read_int("stage", out.stage, 0);
  if (out.stage > 3) r.fail("stage", "an integer in [0, 3]", r.raw("stage"));
  // DeepSpeed allows 0: every gradient reduced on its own (a bucket per parameter, Zeal's 1).
  r.read_int("reduce_bucket_size", out.reduce_bucket_size, 0);
  out.reduce_bucket_size = std::max<int64_t>(1, out.reduce_bucket_size);
  r.read_bool("reduce_scatter", out.reduce_scatter);
  r.read_bool("overlap_comm", out.overlap_comm);
  r.read_bool("contiguous_gradients", out.contiguous_gradients);
  r.read_bool("allgather_partitions", out.allgather_partitions);
  r.read_int("allgather_bucket_size", out.allgather_bucket_size, 0);
  out.allgather_bucket_size = std::max<int64_t>(1, out.allgather_bucket_size);
  // Stage 3 keys, under DeepSpeed's names and their stage3_-prefixed aliases.
  auto read_alias = [&](const std::string& name, int64_t& out, int64_t min_value) {
    r.read_int(name, out, min_value);
    r.read_int("stage3_" + name, out, min_value);
  };
  read_alias("prefetch_bucket_size", out.prefetch_bucket_size, 0);
  read_alias("param_persistence_threshold", out.param_persistence_threshold, 0);
  read_alias("max_live_parameters", out.max_live_parameters, 0);
  read_alias("max_reuse_distance", out.max_reuse_distance, 0);
  r.read_int("model_persistence_threshold", out.model_persistence_threshold, 0);
  r.read_bool("gather_16bit_weights_on_model_save", out.gather_16bit_weights_on_model_save);
  r.read_bool("stage3_gather_16bit_weights_on_model_save", out.gather_16bit_weights_on_model_save);
  r.read_bool("stage3_gather_fp16_weights_on_model_save", out.gather_16bit_weights_on_model_save);
  r.read_bool("ignore_unused_parameters", out.ignore_unused_parameters);
  r.read_int("sub_group_size", out.sub_group_size, 0);
  if (out.sub_group_size == 0) out.sub_group_size = ZeroConfig{}.sub_group_size;  // DeepSpeed: no grouping limit
  r.read_bool("round_robin_gradients", out.round_robin_gradients);
  r.read_bool("elastic_checkpoint", out.elastic_checkpoint);
  r.read_bool("load_from_fp32_weights", out.load_from_fp32_weights);
  if (!out.load_from_fp32_weights)
    r.fail("load_from_fp32_weights", "true (Zeal always restores from the fp32 master weights)",
           r.raw("load_from_fp32_weights"));
  if (r.has("offload_optimizer")) {
    Reader o(r.raw("offload_optimizer"), r.path("offload_optimizer"));
    OffloadOptimizerConfig& off = out.offload_optimizer;
    off.device = read_offload_device(o);
    off.enabled = off.device != OffloadDevice::kNone;
    o.read_bool("pin_memory", off.pin_memory);
    double ratio = 1.0;
    o.read_number("ratio", ratio, 0.0);
    if (ratio != 1.0)
      throw ConfigError("config key '" + o.path("ratio") + "': values other than 1.0 (offload the whole optimizer) "
                        "are not supported yet, got " + std::to_string(ratio));
    o.read_int("buffer_count", off.buffer_count, 1);
    bool fast_init = false;  // accepted: Zeal's swap files are always written once at start
    o.read_bool("fast_init", fast_init);
    o.read_bool("pipeline_read", off.pipeline_read);
    o.only_value("super_offload", false, "SuperOffload is not supported yet");
    o.accept_any({"cpuadam_cores_perc"});  // accepted: Zeal's CPU optimizer uses the OpenMP threads it is given
    o.read_bool("pipeline_write", off.pipeline_write);
    off.nvme_path = read_nvme_path(o, off.device);
    o.finish();
    if (off.enabled && out.stage == 0)
      throw ConfigError("config key '" + o.path("device") + "': offloading the optimizer needs ZeRO stage 1, 2 "
                        "or 3 (zero_optimization.stage is 0)");
  }
  if (r.has("offload_param")) {
    Reader o(r.raw("offload_param"), r.path("offload_param"));
    OffloadParamConfig& off = out.offload_param;
    off.device = read_offload_device(o);
    o.read_bool("pin_memory", off.pin_memory);
    o.read_int("buffer_count", off.buffer_count, 1);
    o.read_int("buffer_size", off.buffer_size, 1);
    o.read_int("max_in_cpu", off.max_in_cpu, 0);
    off.nvme_path = read_nvme_path(o, off.device);
    o.finish();
    if (off.device != OffloadDevice::kNone && out.stage != 3)
      throw ConfigError("config key '" + o.path("device") + "': offloading parameters needs ZeRO stage 3 "
                        "(zero_optimization.stage is " + std::to_string(out.stage) + ")");
  }
  // ZeRO++, MiCS and ZenFlow: accepted switched off (DeepSpeed's defaults), refused when on.
  r.read_int("zero_hpz_partition_size", out.hpz_partition_size, 1);
  if (out.hpz_partition_size > 1 && out.stage != 3)
    throw ConfigError("config key '" + r.path("zero_hpz_partition_size") + "': ZeRO++ hierarchical partitioning "
                      "needs ZeRO stage 3 (zero_optimization.stage is " + std::to_string(out.stage) + ")");
  if (out.hpz_partition_size > 1 && out.offload_param.device == OffloadDevice::kNvme)
    throw ConfigError("config key '" + r.path("zero_hpz_partition_size") + "' is " +
                      std::to_string(out.hpz_partition_size) + " and 'zero_optimization.offload_param.device' is "
                      "\"nvme\": hpZ's secondary copy with parameters swapped to files is not supported yet; use "
                      "offload_param device \"cpu\" with it");
  r.read_bool("zero_quantized_weights", out.quantized_weights);
  if (out.quantized_weights && out.stage != 3)
    throw ConfigError("config key '" + r.path("zero_quantized_weights") + "': ZeRO++ quantized weights need ZeRO "
                      "stage 3 (zero_optimization.stage is " + std::to_string(out.stage) + ")");
  r.read_bool("zero_quantized_nontrainable_weights", out.quantized_nontrainable_weights);
  if (out.quantized_nontrainable_weights && out.stage != 3)
    throw ConfigError("config key '" + r.path("zero_quantized_nontrainable_weights") + "': ZeRO++ quantized frozen "
                      "weights need ZeRO stage 3 (zero_optimization.stage is " + std::to_string(out.stage) + ")");
  if (out.quantized_nontrainable_weights && out.offload_param.device == OffloadDevice::kNvme)
    throw ConfigError("config key '" + r.path("zero_quantized_nontrainable_weights") + "': quantized frozen weights "
                      "are kept in memory, and offload_param.device \"nvme\" swaps every parameter chunk to files; "
                      "use offload_param device \"cpu\" or \"none\" with it");
  r.read_bool("zero_quantized_gradients", out.quantized_gradients);
  if (out.quantized_gradients && out.stage != 3)
    throw ConfigError("config key '" + r.path("zero_quantized_gradients") + "': ZeRO++ quantized gradients need "
                      "ZeRO stage 3 (zero_optimization.stage is " + std::to_string(out.stage) + ")");
  if (r.has("zeropp_loco_param")) {  // LoCo: DeepSpeed's {"err_beta": 0.8, "reset_T": 1024}
    Reader o(r.raw("zeropp_loco_param"), r.path("zeropp_loco_param"));
    out.loco.enabled = true;
    o.read_number("err_beta", out.loco.err_beta, 0.0);
    if (out.loco.err_beta >= 1.0)
      throw ConfigError("config key '" + o.path("err_beta") + "': expected a number in [0, 1) (the share of the old "
                        "error kept each step), got " + std::to_string(out.loco.err_beta));
    o.read_int("reset_T", out.loco.reset_T, 1);
    o.finish();
    if (out.stage != 3)
      throw ConfigError("config key '" + r.path("zeropp_loco_param") + "': ZeRO++ LoCo needs ZeRO stage 3 "
                        "(zero_optimization.stage is " + std::to_string(out.stage) + ")");
  }
  // MiCS: ZeRO-3 within groups of mics_shard_size ranks, replicated across them (Note [MiCS],
  // engine/engine.cpp). -1 is off; the hierarchical gather is accepted (a shard group's gather is one
  // all-gather, whose algorithm the backend picks).
  r.read_int("mics_shard_size", out.mics_shard_size, -1);
  if (out.mics_shard_size == 0)
    throw ConfigError("config key '" + r.path("mics_shard_size") + "': expected -1 (off) or a positive number of "
                      "ranks per shard group, got 0");
  r.read_bool("mics_hierarchical_params_gather", out.mics_hierarchical_params_gather);
  if (out.mics_shard_size > 0 && out.stage != 3)
    throw ConfigError("config key '" + r.path("mics_shard_size") + "': MiCS needs ZeRO stage 3 "
                      "(zero_optimization.stage is " + std::to_string(out.stage) + ")");
  if (out.mics_shard_size > 0 && out.hpz_partition_size > 1)
    throw ConfigError("config key '" + r.path("mics_shard_size") + "' is " + std::to_string(out.mics_shard_size) +
                      " and '" + r.path("zero_hpz_partition_size") + "' is " +
                      std::to_string(out.hpz_partition_size) + ": MiCS and hpZ are two kinds of secondary group; "
                      "set one of them");
  r.only_value("legacy_stage1", false, "DeepSpeed removed it too");
  r.feature_off("zenflow", /*on_when_present=*/true);
  // Tuning knobs of DeepSpeed's own implementation, accepted: Zeal's ZeRO does not need them.
  r.accept_bool({"memory_efficient_linear", "use_multi_rank_bucket_allreduce", "use_all_reduce_for_fetch_params",
                 "stage3_use_all_reduce_for_fetch_params", "allgather_sequential", "stage3_allgather_sequential",
                 "pipeline_loading_checkpoint", "override_module_apply", "log_trace_cache_warnings",
                 "enable_sanity_checks", "save_muon_momentum_buffer_in_memory"});
  r.accept_any({"module_granularity_threshold", "stage3_module_granularity_threshold", "leaf_module"});
  r.finish();
}

void parse_monitor(const json& node, const std::string& section, MonitorConfig& out) {
  Reader r(node, section);
  r.read_bool("enabled", out.enabled);
  r.read_string("output_path", out.output_path);
  r.read_string("job_name", out.job_name);
  r.finish();
}

void parse_wandb(const json& node, WandbConfig& out) {
  Reader r(node, "wandb");
  r.read_bool("enabled", out.enabled);
  r.read_string("team", out.team);
  r.read_string("group", out.group);
  r.read_string("project", out.project);
  r.finish();
}

void parse_flops_profiler(const json& node, FlopsProfilerConfig& out) {
  Reader r(node, "flops_profiler");
  r.read_bool("enabled", out.enabled);
  r.read_number("recompute_fwd_factor", out.recompute_fwd_factor, 0.0);
  r.read_int("profile_step", out.profile_step, 0);
  r.read_int("module_depth", out.module_depth, -1);
  r.read_int("top_modules", out.top_modules, 1);
  r.read_bool("detailed", out.detailed);
  r.read_string("output_file", out.output_file);
  r.finish();
}

void parse_comms_logger(const json& node, CommsLoggerConfig& out) {
  Reader r(node, "comms_logger");
  r.read_bool("enabled", out.enabled);
  r.read_bool("verbose", out.verbose);
  r.read_bool("prof_all", out.prof_all);
  r.read_bool("debug", out.debug);
  if (r.has("prof_ops")) {
    static const std::vector<std::string> ops = {"all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce",
                                                 "all_to_all", "send", "recv", "barrier"};
    const json& list = r.raw("prof_ops");
    if (!list.is_array()) r.fail("prof_ops", "a list of op names", list);
    for (const json& op : list) {
      const bool known = op.is_string() && std::find(ops.begin(), ops.end(), op.get<std::string>()) != ops.end();
      if (!known)
        throw ConfigError("config key 'comms_logger.prof_ops': expected op names (all_reduce, reduce_scatter, "
                          "all_gather, broadcast, reduce, all_to_all, send, recv, barrier), got " + show(op) +
                          (op.is_string() ? did_you_mean(op.get<std::string>(), ops) : std::string()));
      out.prof_ops.push_back(op.get<std::string>());
    }
  }
  r.finish();
}

void parse_aio(const json& node, AioConfig& out) {
  Reader r(node, "aio");
  r.read_int("block_size", out.block_size, 1);
  if (out.block_size % 4096 != 0)
    r.fail("block_size", "a positive multiple of 4096 (O_DIRECT transfers are page-aligned)", r.raw("block_size"));
  r.read_int("queue_depth", out.queue_depth, 1);
  if (out.queue_depth > 4096) r.fail("queue_depth", "an integer in [1, 4096]", r.raw("queue_depth"));
  r.read_int("thread_count", out.thread_count, 1);
  r.read_int("intra_op_parallelism", out.thread_count, 1);
  if (out.thread_count > 64)
    r.fail(r.has("intra_op_parallelism") ? "intra_op_parallelism" : "thread_count", "an integer in [1, 64]",
           r.raw(r.has("intra_op_parallelism") ? "intra_op_parallelism" : "thread_count"));
  r.read_bool("single_submit", out.single_submit);
  r.read_bool("overlap_events", out.overlap_events);
  bool use_gds = false;
  r.read_bool("use_gds", use_gds);
  if (use_gds) r.fail("use_gds", "false (GPUDirect Storage is not supported)", r.raw("use_gds"));
  r.finish();
}

// The compressed optimizers and the ZeRO stages they work with (docs/compression.md).
void check_compressed_optimizer(const Config& c) {
  const OptimizerConfig& o = c.optimizer;
  if (!o.compressed()) return;
  const std::string name = to_string(o.type);
  const int stage = c.zero_optimization.stage;
  if (o.type == OptimizerType::kOneBitAdam && stage > 1)
    throw ConfigError("config key 'zero_optimization.stage': OneBitAdam works with ZeRO stage 0 or 1, got " +
                      std::to_string(stage) +
                      " (past its freeze step every rank keeps the whole momentum and reduces none of the gradients, "
                      "so there is nothing for stage 2 or 3 to partition)");
  if (o.type == OptimizerType::kZeroOneAdam && stage != 0)
    throw ConfigError("config key 'zero_optimization.stage': ZeroOneAdam works with ZeRO stage 0 only, got " +
                      std::to_string(stage) +
                      " (its local steps update every parameter on every rank with that rank's own momentum and "
                      "variance, so no optimizer state can be partitioned)");
  if (o.type == OptimizerType::kOneBitLamb && stage > 1)
    throw ConfigError("config key 'zero_optimization.stage': OneBitLamb works with ZeRO stage 0 or 1, got " +
                      std::to_string(stage) +
                      " (past its freeze step every rank keeps the whole momentum and reduces none of the gradients, "
                      "so there is nothing for stage 2 or 3 to partition)");
  if (c.zero_optimization.offload_optimizer.enabled)
    throw ConfigError("config key 'zero_optimization.offload_optimizer': " + name +
                      " cannot be offloaded (its compressed momentum lives beside the model); remove the section or "
                      "set device \"none\"");
}

// NVMe offload swaps the master weights and the optimizer state a sub-group at a time (a config
// without an optimizer section trains a client optimizer, which the engine refuses with NVMe).
void check_nvme_offload(const Config& c) {
  const OffloadOptimizerConfig& o = c.zero_optimization.offload_optimizer;
  const OptimizerConfig& opt = c.optimizer;
  if (o.device != OffloadDevice::kNvme || !opt.present) return;
  if (opt.type == OptimizerType::kLamb)
    throw ConfigError("config key 'zero_optimization.offload_optimizer.device': Lamb needs whole tensors for its "
                      "per-tensor trust ratio, which NVMe offload swaps in sub-groups; use device \"cpu\" or another "
                      "optimizer");
  // The master weights, then the optimizer's state tensors.
  const int64_t tensors = 1 + (opt.type == OptimizerType::kSgd       ? (opt.momentum != 0.0 ? 1 : 0)
                               : opt.type == OptimizerType::kAdagrad ? 1
                                                                     : 2);
  if (o.buffer_count < tensors)
    throw ConfigError("config key 'zero_optimization.offload_optimizer.buffer_count': expected at least " +
                      std::to_string(tensors) + " (one buffer per swapped tensor of a sub-group: the master weights and the " +
                      to_string(opt.type) + " state), got " + std::to_string(o.buffer_count));
}

}  // namespace

Config Config::from_json(const json& root) {
  Config c;
  Reader r(root, "");
  r.read_int("train_batch_size", c.train_batch_size, 1);
  r.read_int("train_micro_batch_size_per_gpu", c.train_micro_batch_size_per_gpu, 1);
  r.read_int("gradient_accumulation_steps", c.gradient_accumulation_steps, 1);
  if (r.has("optimizer")) parse_optimizer(r.raw("optimizer"), c.optimizer);
  if (r.has("scheduler")) parse_scheduler(r.raw("scheduler"), c.scheduler);
  if (r.has("fp16")) parse_fp16(r.raw("fp16"), c.fp16);
  for (const char* key : {"bf16", "bfloat16"}) {
    if (!r.has(key)) continue;
    Reader b(r.raw(key), key);
    b.read_bool("enabled", c.bf16);
    b.only_value("immediate_grad_update", false, "Zeal accumulates bf16 gradients in its flat buffer");
    b.accept_bool({"check_grad_overflow"});  // accepted: bf16 has fp32's range; Zeal's norm is checked when clipping
    b.only_value("bf16_master_weights_and_grads", false, "Zeal keeps fp32 master weights");
    b.only_value("bf16_optimizer_states", false, "Zeal keeps fp32 optimizer state");
    b.finish();
  }
  r.read_number("gradient_clipping", c.gradient_clipping, 0.0);
  // Accelerate writes steps_per_print: Infinity (never print); 1e5 and the like arrive as floats.
  if (const json* v = r.raw_or_null("steps_per_print"); v && v->is_number_float() && std::isinf(v->get<double>()) &&
                                                         v->get<double>() > 0) {
    (void)r.has("steps_per_print");
    c.steps_per_print = INT64_MAX;
  } else {
    r.read_int("steps_per_print", c.steps_per_print, 1);
  }
  r.read_bool("wall_clock_breakdown", c.wall_clock_breakdown);
  if (r.has("zero_optimization")) parse_zero(r.raw("zero_optimization"), c.zero_optimization);
  std::string comm = r.read_choice("communication_data_type", {"fp32", "fp16", "bf16", "bfp16"}, "");
  c.communication_data_type = comm == "fp32"   ? CommDtype::kFp32
                              : comm == "fp16" ? CommDtype::kFp16
                              : comm.empty()   ? CommDtype::kDefault
                                               : CommDtype::kBf16;
  r.read_bool("prescale_gradients", c.prescale_gradients);
  r.read_number("gradient_predivide_factor", c.gradient_predivide_factor, 0.0, true);
  r.read_number("comms_timeout_s", c.comms_timeout_s, 0.0, true);
  if (r.has("aio")) parse_aio(r.raw("aio"), c.aio);
  if (r.has("comms_logger")) parse_comms_logger(r.raw("comms_logger"), c.comms_logger);
  // The client-optimizer rules (python/zeal/client_optim.py applies them, as DeepSpeed's engine).
  r.accept_bool({"zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer"});
  // Read elsewhere: "pipeline" by zeal.pipe (a PipelineModule), "activation_checkpointing" by the
  // model's own checkpointing calls, "checkpoint" settings of DeepSpeed's checkpoint writer (Zeal's
  // checkpoints are always validated and atomic), and debugging or logging switches.
  r.accept_any({"activation_checkpointing", "checkpoint", "timers", "log_level", "vocabulary_size",
                "allgather_size", "seq_parallel_communication_data_type"});
  if (r.has("pipeline"))  // zeal.pipe reads it and hands the engine of each stage the config without it
    throw ConfigError("config key 'pipeline': pipeline parallelism needs the model to be a zeal.pipe.PipelineModule "
                      "(Python), which takes this section");
  r.accept_bool({"memory_breakdown", "dump_state", "managed_gradient_accumulation"});
  r.only_value("dataloader_drop_last", false, "Zeal's loader keeps the last partial batch");
  r.only_value("sparse_gradients", false, "sparse gradients are not supported yet");
  r.accept_bool({"disable_allgather"});  // parsed and unused by DeepSpeed too
  r.only_value("graph_harvesting", false, "CUDA graph harvesting is not supported yet");
  r.only_value("use_data_before_expert_parallelism", false,
               "Zeal's mesh puts the expert ranks consecutive (DeepSpeed's default layout; docs/moe.md)");
  r.only_value("gradient_allreduce_op", "mean", "Zeal averages gradients over the data-parallel ranks");
  r.read_int("sequence_parallel_size", c.sequence_parallel_size, 1);
  if (r.has("data_types")) {  // gradients accumulate in the model's dtype, as DeepSpeed's default
    Reader d(r.raw("data_types"), "data_types");
    const std::string model = c.fp16.enabled ? "fp16" : c.bf16 ? "bf16" : "fp32";
    for (const char* key : {"grad_accum_dtype", "param_dtype", "buffer_dtype"}) {
      if (!d.has(key)) continue;
      const json& v = d.raw(key);
      std::string given = v.is_string() ? v.get<std::string>() : "";
      for (const auto& [alias, name] : {std::pair<std::string, std::string>{"float32", "fp32"}, {"float", "fp32"},
                                        {"torch.float32", "fp32"}, {"float16", "fp16"}, {"half", "fp16"},
                                        {"torch.float16", "fp16"}, {"bfloat16", "bf16"}, {"torch.bfloat16", "bf16"}})
        if (given == alias) given = name;
      if (given != model)
        throw ConfigError("config key 'data_types." + std::string(key) + "': " + model +
                          " (the model's dtype) is what this Zeal version supports, got " + show(v));
    }
    d.finish();
  }
  // DeepSpeed features this Zeal version lacks: accepted while off, "not supported yet" when on.
  if (r.has("tensorboard")) parse_monitor(r.raw("tensorboard"), "tensorboard", c.tensorboard);
  if (r.has("csv_monitor")) parse_monitor(r.raw("csv_monitor"), "csv_monitor", c.csv_monitor);
  if (r.has("wandb")) parse_wandb(r.raw("wandb"), c.wandb);
  if (r.has("flops_profiler")) parse_flops_profiler(r.raw("flops_profiler"), c.flops_profiler);
  for (const char* key : {"comet", "autotuning",
                          "elasticity", "progressive_layer_drop", "hybrid_engine", "data_efficiency",
                          "curriculum_learning", "nebula", "amp", "torch_autocast", "eigenvalue", "expert_parallel"})
    r.feature_off(key);
  for (const char* key : {"sparse_attention", "datastates_ckpt", "weight_quantization"})
    r.feature_off(key, /*on_when_present=*/true);
  if (r.has("compression_training") && r.raw("compression_training").dump().find("\"enabled\":true") != std::string::npos)
    throw ConfigError("config key 'compression_training': compression training is not supported yet; switch every "
                      "technique's enabled off or remove the section");
  if (r.has("quantize_training") && r.raw("quantize_training").dump().find("\"enabled\":true") != std::string::npos)
    throw ConfigError("config key 'quantize_training': MoQ quantized training is not supported yet; remove the section");
  if (r.has("compile")) {
    const json& v = r.raw("compile");
    if (v.is_object() && v.value("deepcompile", false) == true)
      throw ConfigError("config key 'compile.deepcompile': DeepCompile is not supported yet; set it to false");
  }
  if (r.has("tensor_parallel")) {
    const json& v = r.raw("tensor_parallel");
    if (v.is_object() && v.contains("autotp_size") && v.at("autotp_size").is_number() &&
        v.at("autotp_size").get<double>() > 1)
      throw ConfigError("config key 'tensor_parallel.autotp_size': automatic tensor parallelism is not supported yet; "
                        "use zeal.tensor_parallel's layers (docs/tensor_parallel.md)");
  }
  r.finish_top_level();
  if (c.fp16.enabled && c.bf16)
    throw ConfigError("config keys 'fp16.enabled' and 'bf16.enabled' are both true: choose one precision");
  check_compressed_optimizer(c);
  check_nvme_offload(c);
  return c;
}

Config Config::from_string(const std::string& text) { return from_json(parse_text(text)); }

json Config::parse_text(const std::string& text) {
  // One bounded pass (zeal/core/json.h): depth, duplicate keys, NUL bytes and ill-formed UTF-8
  // are refused with the byte offset and the key path.
  json root;
  JsonProblem problem;
  if (!parse_json(relax_config_json(text), root, problem)) {
    if (problem.what.rfind("duplicate key", 0) == 0)
      throw ConfigError("config key '" + clip_key(problem.key_path) + "' appears twice (duplicate keys are rejected, as "
                        "DeepSpeed does; which value was meant is ambiguous)");
    throw ConfigError("config is not valid JSON " + problem.describe());
  }
  // Infinity was read as the marker string (relax_config_json): +inf again, wherever it stands.
  std::vector<json*> stack{&root};
  while (!stack.empty()) {
    json* v = stack.back();
    stack.pop_back();
    if (v->is_string() && v->get_ref<const std::string&>() == "\xE2\x88\x9E") *v = std::numeric_limits<double>::infinity();
    if (v->is_structured())
      for (auto& child : *v) stack.push_back(&child);
  }
  return root;
}

Config Config::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("config file '" + path + "' cannot be opened");
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return from_string(buffer.str());
  } catch (const ConfigError& e) {
    throw ConfigError(path + ": " + e.what());
  }
}

Precision Config::precision() const {
  if (fp16.enabled) return Precision::kFp16;
  if (bf16) return Precision::kBf16;
  return Precision::kFp32;
}

BatchSizes Config::resolve_batch(int64_t dp) const {
  ZEAL_CHECK_AS(ConfigError, dp >= 1, "data-parallel size must be >= 1, got ", dp);
  const auto& tb = train_batch_size;
  const auto& mb = train_micro_batch_size_per_gpu;
  const auto& gas = gradient_accumulation_steps;
  auto formula = [&](int64_t t, int64_t m, int64_t g) {
    return detail::concat("train_batch_size (", t, ") must equal train_micro_batch_size_per_gpu (", m,
                          ") * gradient_accumulation_steps (", g, ") * data-parallel size (", dp, ") = ", m * g * dp);
  };
  if (tb && mb && gas) {
    if (*tb != *mb * *gas * dp) throw ConfigError("inconsistent batch config: " + formula(*tb, *mb, *gas));
    return {*tb, *mb, *gas};
  }
  if (tb && mb) {
    if (*tb % (*mb * dp) != 0)
      throw ConfigError(detail::concat("inconsistent batch config: train_batch_size (", *tb,
                                       ") is not divisible by train_micro_batch_size_per_gpu (", *mb,
                                       ") * data-parallel size (", dp, ") = ", *mb * dp));
    return {*tb, *mb, *tb / (*mb * dp)};
  }
  if (tb && gas) {
    if (*tb % (*gas * dp) != 0)
      throw ConfigError(detail::concat("inconsistent batch config: train_batch_size (", *tb,
                                       ") is not divisible by gradient_accumulation_steps (", *gas,
                                       ") * data-parallel size (", dp, ") = ", *gas * dp));
    return {*tb, *tb / (*gas * dp), *gas};
  }
  if (mb && gas) return {*mb * *gas * dp, *mb, *gas};
  if (tb) {
    if (*tb % dp != 0)
      throw ConfigError(detail::concat("inconsistent batch config: train_batch_size (", *tb,
                                       ") is not divisible by the data-parallel size (", dp, ")"));
    return {*tb, *tb / dp, 1};
  }
  if (mb) return {*mb * dp, *mb, 1};
  throw ConfigError("batch config: set train_batch_size or train_micro_batch_size_per_gpu (or both)");
}

const char* to_string(OptimizerType type) {
  switch (type) {
    case OptimizerType::kAdam: return "Adam";
    case OptimizerType::kAdamW: return "AdamW";
    case OptimizerType::kSgd: return "SGD";
    case OptimizerType::kLamb: return "Lamb";
    case OptimizerType::kAdagrad: return "Adagrad";
    case OptimizerType::kOneBitAdam: return "OneBitAdam";
    case OptimizerType::kZeroOneAdam: return "ZeroOneAdam";
    case OptimizerType::kOneBitLamb: return "OneBitLamb";
  }
  return "?";
}

std::vector<std::string> scheduler_names() {
  std::vector<std::string> names;
  for (auto type : {SchedulerType::kWarmupLR, SchedulerType::kWarmupDecayLR, SchedulerType::kWarmupCosineLR,
                    SchedulerType::kOneCycle, SchedulerType::kLRRangeTest})
    names.emplace_back(to_string(type));
  return names;
}

const char* to_string(SchedulerType type) {
  switch (type) {
    case SchedulerType::kWarmupLR: return "WarmupLR";
    case SchedulerType::kWarmupDecayLR: return "WarmupDecayLR";
    case SchedulerType::kWarmupCosineLR: return "WarmupCosineLR";
    case SchedulerType::kOneCycle: return "OneCycle";
    case SchedulerType::kLRRangeTest: return "LRRangeTest";
  }
  return "?";
}

}  // namespace zeal
