#include "zeal/optim/client_optimizer.h"

#include "zeal/core/error.h"

namespace zeal::optim {

ClientOptimizer::ClientOptimizer(ClientCallbacks callbacks) : callbacks_(std::move(callbacks)) {
  ZEAL_CHECK(callbacks_.update && callbacks_.state_names && callbacks_.state && callbacks_.scalars &&
                 callbacks_.restore_scalars,
             "a client optimizer needs every callback (update, state_names, state, scalars, restore_scalars)");
}

void ClientOptimizer::update(at::Tensor& params, const at::Tensor& grads, const std::vector<ParamGroup>& groups) {
  callbacks_.update(params, grads, groups);
}

std::vector<std::string> ClientOptimizer::state_names() const { return callbacks_.state_names(); }

at::Tensor& ClientOptimizer::state(const std::string& name) {
  at::Tensor t = callbacks_.state(name);
  ZEAL_CHECK(t.defined() && t.scalar_type() == at::kFloat && t.dim() == 1,
             "client optimizer state '", name, "' must be a flat fp32 tensor");
  return states_[name] = t;
}

std::map<std::string, std::vector<double>> ClientOptimizer::scalars() const { return callbacks_.scalars(); }

void ClientOptimizer::restore_scalars(const std::map<std::string, std::vector<double>>& saved) {
  callbacks_.restore_scalars(saved);
}

}  // namespace zeal::optim
