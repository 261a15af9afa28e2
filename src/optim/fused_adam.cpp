#include "zeal/optim/fused_adam.h"

#include <cmath>

#include "cuda/fused_adam.h"
#include "zeal/core/error.h"
#include "optim/fused_batches.h"

namespace zeal::optim {
void fused_adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq,
                     const AdamHyper& h) {
  if (params.empty()) return;
  const kernels::ParamDtype kind = check_fused_tensors("FusedAdam", "CPUAdam", params, grads, exp_avg, exp_avg_sq);
  const double bc1 = h.bias_correction ? 1.0 - std::pow(h.beta1, static_cast<double>(h.step)) : 1.0;
  const double bc2 = h.bias_correction ? 1.0 - std::pow(h.beta2, static_cast<double>(h.step)) : 1.0;
  kernels::FusedAdamHyper hyper{static_cast<float>(-(h.lr / bc1)),
                                static_cast<float>(std::sqrt(bc2)),
                                static_cast<float>(1.0 - h.beta1),
                                static_cast<float>(h.beta2),
                                static_cast<float>(1.0 - h.beta2),
                                static_cast<float>(h.eps),
                                static_cast<float>(h.weight_decay),
                                static_cast<float>(1.0 - h.lr * h.weight_decay),
                                h.decoupled};
  std::vector<int64_t> numels;
  for (const auto& p : params) numels.push_back(p.numel());
  pack_fused_batches<kernels::FusedAdamBatch>(
      numels,
      [&](kernels::FusedAdamBatch& batch, int slot, size_t i) {
        batch.params[slot] = params[i].data_ptr();
        batch.grads[slot] = grads[i].data_ptr();
        batch.exp_avg[slot] = exp_avg[i].data_ptr<float>();
        batch.exp_avg_sq[slot] = exp_avg_sq[i].data_ptr<float>();
        batch.numel[slot] = numels[i];
      },
      [&](const kernels::FusedAdamBatch& batch) {
        cudaError_t err = kernels::fused_adam_launch(batch, kind, hyper, /*legacy default stream*/ nullptr);
        ZEAL_CHECK(err == cudaSuccess, "FusedAdam: kernel launch failed: ", cudaGetErrorString(err));
      });
}

}  // namespace zeal::optim
