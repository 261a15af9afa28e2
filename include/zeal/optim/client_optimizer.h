// The user's own optimizer (DeepSpeed's "client optimizer": a torch.optim.Optimizer, or a callable
// that builds one, passed to initialize). The engine keeps everything around the update: loss
// scaling, the overflow check, clipping, the gradient reduction and the ZeRO partitioning. Only
// the update itself is the user's: it runs over the fp32 master elements this rank owns, as
// DeepSpeed's ZeRO optimizers run the wrapped optimizer over their fp32 partition.
//
// The front end (python/zeal/client_optim.py) supplies the callbacks: the update, and the
// optimizer's per-element state as flat tensors over the same elements as the master weights
// (so checkpoints save and reshard it like Zeal's own optimizers' state).
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "zeal/optim/optimizer.h"

namespace zeal::optim {

struct ClientCallbacks {
  std::string name;  // e.g. "torch.optim.AdamW": checkpoints record it and refuse another
  // One update: params is the flat fp32 master (owned elements), grads the gradients over the same
  // elements, unscaled and clipped; groups the segments (ParamGroup::begin/end) in group order.
  std::function<void(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups)> update;
  std::function<std::vector<std::string>()> state_names;
  // The named state as one flat fp32 tensor over the master's elements; it must share storage with
  // the optimizer's own state, so that a checkpoint load that fills it in place takes effect.
  std::function<at::Tensor(const std::string&)> state;
  std::function<std::map<std::string, std::vector<double>>()> scalars;
  std::function<void(const std::map<std::string, std::vector<double>>&)> restore_scalars;
};

class ClientOptimizer : public Optimizer {
 public:
  explicit ClientOptimizer(ClientCallbacks callbacks);
  void update(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) override;
  const char* name() const override { return callbacks_.name.c_str(); }
  std::vector<std::string> state_names() const override;
  at::Tensor& state(const std::string& name) override;
  std::map<std::string, std::vector<double>> scalars() const override;
  void restore_scalars(const std::map<std::string, std::vector<double>>& saved) override;

 private:
  ClientCallbacks callbacks_;
  std::map<std::string, at::Tensor> states_;  // what state() handed out, so it can return a reference
};

}  // namespace zeal::optim
