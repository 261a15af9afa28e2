#include "zeal/optim/fused_adam.h"

#include <cmath>

#include "cuda/fused_adam.h"
#include "zeal/core/error.h"

namespace zeal::optim {
namespace {

kernels::ParamDtype param_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::ParamDtype::kFp32;
    case at::kBFloat16: return kernels::ParamDtype::kBf16;
    case at::kHalf: return kernels::ParamDtype::kFp16;
    default: break;
  }
  throw Error(std::string("FusedAdam: parameters of dtype ") + c10::toString(t) +
              " are not supported (float32, bfloat16 or float16)");
}

void check_device(const at::Tensor& t, const char* what, size_t i, const at::Device& device, int64_t numel) {
  ZEAL_CHECK(t.defined() && t.is_cuda(), "FusedAdam: ", what, " ", i, " is on ",
             t.defined() ? t.device().str() : std::string("nothing"),
             "; it updates CUDA tensors (CPU parameters: CPUAdam)");
  ZEAL_CHECK(t.device() == device, "FusedAdam: ", what, " ", i, " is on ", t.device().str(), ", the first parameter on ",
             device.str(), "; one call updates the tensors of one device");
  ZEAL_CHECK(t.is_contiguous(), "FusedAdam: ", what, " ", i, " is not contiguous");
  ZEAL_CHECK(t.numel() == numel, "FusedAdam: ", what, " ", i, " has ", t.numel(), " elements, its parameter ", numel);
}

}  // namespace

void fused_adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq,
                     const AdamHyper& h) {
  const size_t n = params.size();
  ZEAL_CHECK(grads.size() == n && exp_avg.size() == n && exp_avg_sq.size() == n, "FusedAdam: ", n, " parameters but ",
             grads.size(), " gradients, ", exp_avg.size(), " exp_avg and ", exp_avg_sq.size(), " exp_avg_sq");
  if (n == 0) return;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  const kernels::ParamDtype kind = param_dtype(dtype);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_device(params[i], "parameter", i, device, numel);
    check_device(grads[i], "gradient", i, device, numel);
    check_device(exp_avg[i], "exp_avg", i, device, numel);
    check_device(exp_avg_sq[i], "exp_avg_sq", i, device, numel);
    ZEAL_CHECK(params[i].scalar_type() == dtype && grads[i].scalar_type() == dtype, "FusedAdam: parameter ", i,
               " or its gradient is not ", c10::toString(dtype), " like parameter 0; one call takes one dtype");
    ZEAL_CHECK(exp_avg[i].scalar_type() == at::kFloat && exp_avg_sq[i].scalar_type() == at::kFloat,
               "FusedAdam: the moments of parameter ", i, " must be float32");
  }
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
  // Pack tensors and their chunks into batches; a tensor may continue into the next batch.
  kernels::FusedAdamBatch batch{};
  int tensors = 0;
  auto flush = [&] {
    if (batch.num_blocks > 0) {
      cudaError_t err = kernels::fused_adam_launch(batch, kind, hyper, /*legacy default stream*/ nullptr);
      ZEAL_CHECK(err == cudaSuccess, "FusedAdam: kernel launch failed: ", cudaGetErrorString(err));
    }
    batch = kernels::FusedAdamBatch{};
    tensors = 0;
  };
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const int64_t chunks = (numel + kernels::kFusedChunk - 1) / kernels::kFusedChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (c == 0 || tensors == 0) {  // (re)register tensor i in this batch
        if (tensors == kernels::kFusedMaxTensors) flush();
        batch.params[tensors] = params[i].data_ptr();
        batch.grads[tensors] = grads[i].data_ptr();
        batch.exp_avg[tensors] = exp_avg[i].data_ptr<float>();
        batch.exp_avg_sq[tensors] = exp_avg_sq[i].data_ptr<float>();
        batch.numel[tensors] = numel;
        ++tensors;
      }
      batch.tensor_of[batch.num_blocks] = static_cast<unsigned char>(tensors - 1);
      batch.chunk_of[batch.num_blocks] = static_cast<int>(c);
      if (++batch.num_blocks == kernels::kFusedMaxBlocks) flush();
    }
  }
  flush();
}

}  // namespace zeal::optim
