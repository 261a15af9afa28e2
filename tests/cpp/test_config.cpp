#include <gtest/gtest.h>

#include "zeal/core/config.h"
#include "zeal/core/error.h"

using zeal::Config;
using zeal::ConfigError;

namespace {

std::string error_of(const std::string& json) {
  try {
    Config::from_string(json);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Config, ParsesDeepSpeedKeys) {
  Config c = Config::from_string(R"({
    "train_batch_size": 32, "gradient_accumulation_steps": 2,
    "optimizer": {"type": "adamw", "params": {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10, "warmup_type": "linear"}},
    "fp16": {"enabled": true, "initial_scale_power": 12, "loss_scale_window": 50, "hysteresis": 1},
    "gradient_clipping": 1.0, "steps_per_print": 5, "wall_clock_breakdown": true,
    "zero_optimization": {"stage": 0, "reduce_bucket_size": 5e7},
    "communication_data_type": "fp32", "prescale_gradients": true, "gradient_predivide_factor": 2.0
  })");
  EXPECT_EQ(c.optimizer.type, zeal::OptimizerType::kAdamW);
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 3e-4);
  EXPECT_DOUBLE_EQ(c.optimizer.betas[1], 0.95);
  EXPECT_EQ(c.scheduler.type, zeal::SchedulerType::kWarmupDecayLR);
  EXPECT_FALSE(c.scheduler.warmup_log);
  EXPECT_EQ(c.scheduler.total_num_steps, 100);
  EXPECT_EQ(c.precision(), zeal::Precision::kFp16);
  EXPECT_EQ(c.fp16.initial_scale_power, 12);
  EXPECT_EQ(c.zero_optimization.reduce_bucket_size, 50000000);
  EXPECT_EQ(c.communication_data_type, zeal::CommDtype::kFp32);
  EXPECT_TRUE(c.prescale_gradients);
  EXPECT_EQ(c.steps_per_print, 5);
}

TEST(Config, DeepSpeedFileSyntaxAndValues) {
  // hjson as real configs use it: comments, trailing commas, Infinity (steps_per_print: never).
  Config c = Config::from_string("# c\n{\"train_batch_size\": 8, // c\n /* c */ \"steps_per_print\": Infinity,\n"
                                 " \"zero_optimization\": {\"stage\": 2, \"cpu_offload\": true, \"sub_group_size\": 0,},}");
  EXPECT_EQ(c.steps_per_print, INT64_MAX);
  EXPECT_EQ(c.zero_optimization.offload_optimizer.device, zeal::OffloadDevice::kCpu);
  EXPECT_EQ(c.zero_optimization.sub_group_size, 1000000000);
  Config z = Config::from_string(R"({"train_batch_size": 8, "zero_optimization": true, "_comment": "ignored"})");
  EXPECT_EQ(z.zero_optimization.stage, 1);
}

TEST(Config, Defaults) {
  Config c = Config::from_string(R"({"train_micro_batch_size_per_gpu": 4})");
  EXPECT_EQ(c.precision(), zeal::Precision::kFp32);
  EXPECT_EQ(c.steps_per_print, 10);
  EXPECT_EQ(c.zero_optimization.reduce_bucket_size, 500000000);
  EXPECT_DOUBLE_EQ(c.gradient_predivide_factor, 1.0);
  EXPECT_FALSE(c.optimizer.present);
  Config b = Config::from_string(R"({"train_batch_size": 8, "bfloat16": {"enabled": true}})");
  EXPECT_EQ(b.precision(), zeal::Precision::kBf16);
}

TEST(Config, BatchArithmetic) {
  auto resolve = [](const std::string& json, int dp) { return Config::from_string(json).resolve_batch(dp); };
  auto b = resolve(R"({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4})", 2);
  EXPECT_EQ(b.gradient_accumulation_steps, 4);
  b = resolve(R"({"train_batch_size": 32, "gradient_accumulation_steps": 2})", 4);
  EXPECT_EQ(b.micro_batch_size, 4);
  b = resolve(R"({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5})", 2);
  EXPECT_EQ(b.train_batch_size, 30);
  b = resolve(R"({"train_batch_size": 12})", 3);
  EXPECT_EQ(b.micro_batch_size, 4);
  EXPECT_EQ(b.gradient_accumulation_steps, 1);
  try {
    resolve(R"({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})", 2);
    FAIL() << "inconsistent batch accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("= 16"), std::string::npos) << e.what();
  }
  EXPECT_THROW(resolve(R"({"gradient_accumulation_steps": 2})", 1), ConfigError);
  EXPECT_THROW(resolve(R"({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4})", 1), ConfigError);
}

struct BadConfig {
  const char* json;
  std::vector<const char*> fragments;  // each must appear in the message
};

class BadConfigs : public ::testing::TestWithParam<BadConfig> {};

TEST_P(BadConfigs, NameKeyExpectationAndValue) {
  std::string message = error_of(GetParam().json);
  ASSERT_FALSE(message.empty()) << "accepted: " << GetParam().json;
  for (const char* fragment : GetParam().fragments)
    EXPECT_NE(message.find(fragment), std::string::npos) << "message: " << message << "\nmissing: " << fragment;
}

INSTANTIATE_TEST_SUITE_P(
    Config, BadConfigs,
    ::testing::Values(
        BadConfig{R"({"train_batch_size": "32"})", {"'train_batch_size'", "integer >= 1", "\"32\""}},
        BadConfig{R"({"train_batch_size": 0})", {"'train_batch_size'", ">= 1", "0"}},
        BadConfig{R"({"train_batch_sise": 8})", {"unknown config key 'train_batch_sise'", "did you mean 'train_batch_size'"}},
        BadConfig{R"({"optimizer": {"type": "Adamm"}})", {"'optimizer.type'", "did you mean 'Adam'"}},
        BadConfig{R"({"optimizer": {"type": "Adam", "params": {"lr": -1}}})", {"'optimizer.params.lr'", ">= 0", "-1"}},
        BadConfig{R"({"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}})", {"'optimizer.params.betas'", "two numbers"}},
        BadConfig{R"({"optimizer": {"type": "Adam", "params": {"momentum": 0.9}}})", {"unknown config key 'optimizer.params.momentum'"}},
        BadConfig{R"({"optimizer": {"type": "Lion"}})", {"'optimizer.type'", "not supported yet"}},
        BadConfig{R"({"optimizer": {"type": "ZeroOneAdam"}, "zero_optimization": {"stage": 1}})",
                  {"'zero_optimization.stage'", "ZeroOneAdam", "stage 0 only", "got 1"}},
        BadConfig{R"({"optimizer": {"type": "OneBitAdam"}, "zero_optimization": {"stage": 2}})",
                  {"'zero_optimization.stage'", "OneBitAdam", "stage 0 or 1, got 2"}},
        BadConfig{R"({"fp16": {"enabled": "yes"}})", {"'fp16.enabled'", "boolean", "\"yes\""}},
        BadConfig{R"({"fp16": {"enabled": true}, "bf16": {"enabled": true}})", {"fp16.enabled", "bf16.enabled", "both"}},
        BadConfig{R"({"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}})",
                  {"'zero_optimization.offload_param.device'", "needs ZeRO stage 3"}},
        BadConfig{R"({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": -1}})",
                  {"'zero_optimization.stage3_prefetch_bucket_size'", ">= 0", "-1"}},
        BadConfig{R"({"zero_optimization": {"stage": 2, "overlap_comm": "yes"}})", {"'zero_optimization.overlap_comm'", "boolean"}},
        BadConfig{R"({"zero_optimization": {"stage": 7}})", {"'zero_optimization.stage'", "[0, 3]"}},
        BadConfig{R"({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})",
                  {"'zero_optimization.offload_optimizer.device'", "needs ZeRO stage 1, 2 or 3"}},
        BadConfig{R"({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}})",
                  {"'zero_optimization.offload_optimizer.nvme_path'", "needs nvme_path", "got nothing"}},
        BadConfig{R"({"aio": {"block_size": 5000}})", {"'aio.block_size'", "multiple of 4096", "5000"}},
        BadConfig{R"({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}})",
                  {"'zero_optimization.offload_optimizer.ratio'", "other than 1.0"}},
        BadConfig{R"({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}})",
                  {"'zero_optimization.offload_optimizer.device'", "\"cpu\""}},
        BadConfig{R"({"pipeline": {"stages": 2}})", {"'pipeline'", "PipelineModule"}},
        BadConfig{R"({"scheduler": {"type": "WarmupDecayLR", "params": {}}})", {"'scheduler.params.total_num_steps'"}},
        BadConfig{R"({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}})", {"'scheduler.params.warmup_type'", "\"log\", \"linear\""}},
        BadConfig{R"({"communication_data_type": "int8"})", {"'communication_data_type'", "\"fp32\""}},
        BadConfig{R"({"gradient_clipping": -0.5})", {"'gradient_clipping'", ">= 0"}},
        BadConfig{R"({"steps_per_print": 2.5})", {"'steps_per_print'", "integer"}},
        BadConfig{R"({"train_batch_size": 8,,})", {"not valid JSON"}},
        BadConfig{R"({"train_batch_size": 8, "zero_optimization": {"stage": 1, "cpu_offload": "yes"}})",
                  {"'zero_optimization.cpu_offload'", "boolean"}},
        BadConfig{R"({"train_batch_size": 8, "comet": {"enabled": true}})", {"'comet.enabled'", "not supported yet"}},
        BadConfig{R"({"train_batch_size": 8, "tensorboard": {"enabled": true, "job_name": 3}})",
                  {"'tensorboard.job_name'", "a string", "3"}},
        BadConfig{R"({"train_batch_size": 8, "flops_profiler": {"enabled": true, "top_modules": 0}})",
                  {"'flops_profiler.top_modules'", ">= 1", "0"}},
        BadConfig{R"({"train_batch_size": "auto"})", {"'train_batch_size'", "Hugging Face Trainer or Accelerate"}},
        BadConfig{R"([1, 2])", {"expected an object"}}));

TEST(Config, MissingFile) {
  EXPECT_THROW(Config::from_file("/nonexistent/zeal.json"), ConfigError);
}

// DeepSpeed spells the stage 3 keys with and without the stage3_ prefix; both land in one field.
TEST(Config, Stage3KeysAndAliases) {
  auto c = zeal::Config::from_string(R"({"train_batch_size": 8, "zero_optimization": {"stage": 3,
      "stage3_prefetch_bucket_size": 123, "param_persistence_threshold": 7, "stage3_max_live_parameters": 1e6,
      "max_reuse_distance": 0, "stage3_gather_16bit_weights_on_model_save": true}})");
  const auto& z = c.zero_optimization;
  EXPECT_EQ(z.stage, 3);
  EXPECT_EQ(z.prefetch_bucket_size, 123);
  EXPECT_EQ(z.param_persistence_threshold, 7);
  EXPECT_EQ(z.max_live_parameters, 1000000);
  EXPECT_EQ(z.max_reuse_distance, 0);
  EXPECT_TRUE(z.gather_16bit_weights_on_model_save);
  auto d = zeal::Config::from_string(R"({"train_batch_size": 8, "zero_optimization": {"stage": 3}})");
  EXPECT_EQ(d.zero_optimization.prefetch_bucket_size, 50000000);
  EXPECT_EQ(d.zero_optimization.param_persistence_threshold, 100000);
}
