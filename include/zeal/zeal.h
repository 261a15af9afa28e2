// Zeal's C++ API for native LibTorch trainers.
//
//   auto engine = zeal::initialize(model, zeal::Config::from_file("configs/mlp_cpp.json"));
//   auto loss = torch::mse_loss(engine.forward(x), y);
//   engine.backward(loss);
//   engine.step();
//
// The same engine as the Python API: the model's parameters become views into the engine's flat
// buffers, gradients are all-reduced across the ranks of the world communicator, and the config
// keys mean what they mean in DeepSpeed.
#pragma once

#include <chrono>
#include <memory>
#include <utility>

#include <torch/nn/module.h>

#include "zeal/comm/world.h"
#include "zeal/core/config.h"
#include "zeal/core/error.h"
#include "zeal/engine/engine.h"

namespace zeal {

template <typename ModuleType>
class TrainingEngine {
 public:
  TrainingEngine(std::shared_ptr<ModuleType> module, std::unique_ptr<engine::Engine> core)
      : module_(std::move(module)), core_(std::move(core)) {}

  // Runs the module's forward (timed for wall_clock_breakdown).
  template <typename... Args>
  auto forward(Args&&... args) {
    auto start = std::chrono::steady_clock::now();
    auto out = module_->forward(std::forward<Args>(args)...);
    core_->add_forward_time(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    return out;
  }

  void backward(const at::Tensor& loss) { core_->backward(loss); }
  void step() { core_->step(); }
  void zero_grad() { core_->zero_grad(); }
  // Checkpoints in the format of checkpoint/checkpoint.h (module buffers are not saved from C++ yet).
  std::string save_checkpoint(const std::string& dir, const std::string& tag, const std::string& client_state_json = "{}") {
    return core_->save_checkpoint(dir, tag, client_state_json, {});
  }
  std::pair<std::string, std::string> load_checkpoint(const std::string& dir, const std::string& tag = "") {
    return core_->load_checkpoint(dir, tag, true, true, false);
  }
  void train(bool on = true) { module_->train(on); }
  void eval() { module_->eval(); }

  bool is_gradient_accumulation_boundary() const { return core_->is_gradient_accumulation_boundary(); }
  int64_t global_steps() const { return core_->global_steps(); }
  std::vector<double> get_lr() const { return core_->get_lr(); }
  double loss_scale() const { return core_->loss_scale(); }
  int rank() const { return core_->world()->rank(); }
  int world_size() const { return core_->world()->size(); }
  const BatchSizes& batch() const { return core_->batch(); }
  const std::shared_ptr<ModuleType>& module() const { return module_; }
  engine::Engine& core() { return *core_; }

 private:
  std::shared_ptr<ModuleType> module_;
  std::unique_ptr<engine::Engine> core_;
};

// Builds the engine over the world communicator (MPI when started by mpirun or the zeal launcher).
template <typename ModuleType>
TrainingEngine<ModuleType> initialize(std::shared_ptr<ModuleType> module, Config config) {
  ZEAL_CHECK_AS(ConfigError, config.zero_optimization.stage < 3,
                "config key 'zero_optimization.stage': stage 3 is not supported by the C++ API yet (it gathers "
                "parameters in module hooks, which libtorch modules lack); use stages 0-2 from C++ or stage 3 from Python");
  auto world = comm::world(comm::Timeout(static_cast<int64_t>(config.comms_timeout_s * 1000.0)));  // sets the default
  switch (config.precision()) {
    case Precision::kFp16: module->to(at::kHalf); break;
    case Precision::kBf16: module->to(at::kBFloat16); break;
    case Precision::kFp32: break;
  }
  engine::ParamGroupSpec group;
  for (const auto& item : module->named_parameters()) {  // names: checkpoints match parameters by them
    group.params.push_back(item.value());
    group.names.push_back(item.key());
  }
  std::vector<engine::ParamGroupSpec> groups{std::move(group)};
  auto core = std::make_unique<engine::Engine>(std::move(groups), std::move(config), std::move(world));
  return TrainingEngine<ModuleType>(std::move(module), std::move(core));
}

}  // namespace zeal
