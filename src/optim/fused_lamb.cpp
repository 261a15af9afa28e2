#include "zeal/optim/fused_lamb.h"

#include <algorithm>
#include <cmath>

#include <ATen/ops/zeros.h>

#include "cuda/fused_lamb.h"
#include "optim/fused_batches.h"
#include "zeal/core/error.h"

namespace zeal::optim {
namespace {

kernels::FusedLambHyper lamb_hyper(const AdamHyper& h, double min_coeff, double max_coeff) {
  ZEAL_CHECK(min_coeff >= 0 && max_coeff >= min_coeff, "FusedLamb: need 0 <= min_coeff <= max_coeff, got ", min_coeff,
             " and ", max_coeff);
  const double bc1 = h.bias_correction ? 1.0 - std::pow(h.beta1, static_cast<double>(h.step)) : 1.0;
  const double bc2 = h.bias_correction ? 1.0 - std::pow(h.beta2, static_cast<double>(h.step)) : 1.0;
  return {static_cast<float>(h.beta1), static_cast<float>(1.0 - h.beta1), static_cast<float>(h.beta2),
          static_cast<float>(1.0 - h.beta2), static_cast<float>(1.0 / bc1), static_cast<float>(1.0 / bc2),
          static_cast<float>(h.eps), static_cast<float>(h.weight_decay), static_cast<float>(h.lr),
          min_coeff, max_coeff};
}

void check_sums(const at::Tensor& sums, const std::vector<int>& slots, const at::Tensor& first) {
  int most = -1;
  for (int s : slots) most = std::max(most, s);
  ZEAL_CHECK(sums.defined() && sums.scalar_type() == at::kDouble && sums.is_contiguous() &&
                 sums.device() == first.device() && sums.numel() >= 2 * (most + 1),
             "FusedLamb: norm_sums must be a contiguous float64 tensor of at least ", 2 * (most + 1),
             " elements on ", first.device().str());
}

template <typename Launch>
void for_each_batch(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>* grads,
                    const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq,
                    const std::vector<int>& slots, const Launch& launch) {
  std::vector<int64_t> numels;
  for (const auto& p : params) numels.push_back(p.numel());
  pack_fused_batches<kernels::FusedLambBatch>(
      numels,
      [&](kernels::FusedLambBatch& batch, int slot, size_t i) {
        batch.params[slot] = params[i].data_ptr();
        batch.grads[slot] = grads ? (*grads)[i].data_ptr() : nullptr;
        batch.exp_avg[slot] = exp_avg[i].data_ptr<float>();
        batch.exp_avg_sq[slot] = exp_avg_sq[i].data_ptr<float>();
        batch.numel[slot] = numels[i];
        batch.slot_of[slot] = slots[i];
      },
      [&](const kernels::FusedLambBatch& batch) {
        cudaError_t err = launch(batch);
        ZEAL_CHECK(err == cudaSuccess, "FusedLamb: kernel launch failed: ", cudaGetErrorString(err));
      });
}

}  // namespace

void fused_lamb_phase1(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq,
                       const std::vector<int>& slots, const AdamHyper& h, const at::Tensor& norm_sums) {
  if (params.empty()) return;
  const kernels::ParamDtype kind = check_fused_tensors("FusedLamb", "CPULamb", params, grads, exp_avg, exp_avg_sq);
  ZEAL_CHECK(slots.size() == params.size(), "FusedLamb: ", slots.size(), " slots for ", params.size(), " tensors");
  check_sums(norm_sums, slots, params[0]);
  const kernels::FusedLambHyper hyper = lamb_hyper(h, 0.0, 0.0);
  double* sums = norm_sums.data_ptr<double>();
  for_each_batch(params, &grads, exp_avg, exp_avg_sq, slots, [&](const kernels::FusedLambBatch& batch) {
    return kernels::fused_lamb_phase1_launch(batch, kind, hyper, sums, /*legacy default stream*/ nullptr);
  });
}

void fused_lamb_phase2(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avg,
                       const std::vector<at::Tensor>& exp_avg_sq, const std::vector<int>& slots, const AdamHyper& h,
                       double min_coeff, double max_coeff, const at::Tensor& norm_sums) {
  if (params.empty()) return;
  const kernels::ParamDtype kind = check_fused_tensors("FusedLamb", "CPULamb", params, params, exp_avg, exp_avg_sq);
  ZEAL_CHECK(slots.size() == params.size(), "FusedLamb: ", slots.size(), " slots for ", params.size(), " tensors");
  check_sums(norm_sums, slots, params[0]);
  const kernels::FusedLambHyper hyper = lamb_hyper(h, min_coeff, max_coeff);
  const double* sums = norm_sums.data_ptr<double>();
  for_each_batch(params, nullptr, exp_avg, exp_avg_sq, slots, [&](const kernels::FusedLambBatch& batch) {
    return kernels::fused_lamb_phase2_launch(batch, kind, hyper, sums, /*legacy default stream*/ nullptr);
  });
}

void fused_lamb_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq,
                     const AdamHyper& h, double min_coeff, double max_coeff) {
  if (params.empty()) return;
  std::vector<int> slots(params.size());
  for (size_t i = 0; i < slots.size(); ++i) slots[i] = static_cast<int>(i);
  at::Tensor sums = at::zeros({static_cast<int64_t>(2 * params.size())}, params[0].options().dtype(at::kDouble));
  fused_lamb_phase1(params, grads, exp_avg, exp_avg_sq, slots, h, sums);
  fused_lamb_phase2(params, exp_avg, exp_avg_sq, slots, h, min_coeff, max_coeff, sums);
}

}  // namespace zeal::optim
