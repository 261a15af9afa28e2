// Packing many tensors into the launches of the multi-tensor CUDA kernels (kernels/cuda/
// fused_adam.h, fused_lamb.h): chunks of kFusedChunk elements, up to kFusedMaxTensors tensors and
// kFusedMaxBlocks chunks a launch; a tensor may continue into the next launch. Private to src/optim.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "cuda/fused_adam.h"
#include "zeal/core/error.h"

namespace zeal::optim {

// Batch has tensor_of[], chunk_of[] and num_blocks; add(batch, slot, i) registers tensor i at
// position slot of the batch; launch(batch) runs a full or final batch.
template <typename Batch, typename Add, typename Launch>
void pack_fused_batches(const std::vector<int64_t>& numels, const Add& add, const Launch& launch) {
  Batch batch{};
  int tensors = 0;
  auto flush = [&] {
    if (batch.num_blocks > 0) launch(batch);
    batch = Batch{};
    tensors = 0;
  };
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] == 0) continue;
    const int64_t chunks = (numels[i] + kernels::kFusedChunk - 1) / kernels::kFusedChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (c == 0 || tensors == 0) {  // (re)register tensor i in this batch
        if (tensors == kernels::kFusedMaxTensors) flush();
        add(batch, tensors, i);
        ++tensors;
      }
      batch.tensor_of[batch.num_blocks] = static_cast<unsigned char>(tensors - 1);
      batch.chunk_of[batch.num_blocks] = static_cast<int>(c);
      if (++batch.num_blocks == kernels::kFusedMaxBlocks) flush();
    }
  }
  flush();
}

// The checks every multi-tensor launch makes, with messages naming the optimizer (`who`) and its
// CPU counterpart; returns the kernels' dtype. Lists of equal length; params and grads one dtype,
// fp32, bf16 or fp16; moments fp32; all contiguous, on one CUDA device.
inline kernels::ParamDtype check_fused_tensors(const char* who, const char* cpu_name, const std::vector<at::Tensor>& params,
                                               const std::vector<at::Tensor>& grads,
                                               const std::vector<at::Tensor>& exp_avg,
                                               const std::vector<at::Tensor>& exp_avg_sq) {
  const size_t n = params.size();
  ZEAL_CHECK(grads.size() == n && exp_avg.size() == n && exp_avg_sq.size() == n, who, ": ", n, " parameters but ",
             grads.size(), " gradients, ", exp_avg.size(), " exp_avg and ", exp_avg_sq.size(), " exp_avg_sq");
  ZEAL_CHECK(n > 0, who, ": no tensors");
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  auto check = [&](const at::Tensor& t, const char* what, size_t i) {
    ZEAL_CHECK(t.defined() && t.is_cuda(), who, ": ", what, " ", i, " is on ",
               t.defined() ? t.device().str() : std::string("nothing"), "; it updates CUDA tensors (CPU parameters: ",
               cpu_name, ")");
    ZEAL_CHECK(t.device() == device, who, ": ", what, " ", i, " is on ", t.device().str(), ", the first parameter on ",
               device.str(), "; one call updates the tensors of one device");
    ZEAL_CHECK(t.is_contiguous(), who, ": ", what, " ", i, " is not contiguous");
    ZEAL_CHECK(t.numel() == params[i].numel(), who, ": ", what, " ", i, " has ", t.numel(), " elements, its parameter ",
               params[i].numel());
  };
  for (size_t i = 0; i < n; ++i) {
    check(params[i], "parameter", i);
    check(grads[i], "gradient", i);
    check(exp_avg[i], "exp_avg", i);
    check(exp_avg_sq[i], "exp_avg_sq", i);
    ZEAL_CHECK(params[i].scalar_type() == dtype && grads[i].scalar_type() == dtype, who, ": parameter ", i,
               " or its gradient is not ", c10::toString(dtype), " like parameter 0; one call takes one dtype");
    ZEAL_CHECK(exp_avg[i].scalar_type() == at::kFloat && exp_avg_sq[i].scalar_type() == at::kFloat, who,
               ": the moments of parameter ", i, " must be float32");
  }
  switch (dtype) {
    case at::kFloat: return kernels::ParamDtype::kFp32;
    case at::kBFloat16: return kernels::ParamDtype::kBf16;
    case at::kHalf: return kernels::ParamDtype::kFp16;
    default: break;
  }
  throw Error(std::string(who) + ": parameters of dtype " + c10::toString(dtype) +
              " are not supported (float32, bfloat16 or float16)");
}

}  // namespace zeal::optim
