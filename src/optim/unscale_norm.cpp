// unscale_and_sum_squares (zeal/optim/cpu_optim.h): the engine's precision path in one pass, on the
// CPU kernel (kernels/cpu/optim_kernels.h) or, for CUDA tensors in a CUDA build, the CUDA one
// (kernels/cuda/unscale_norm.h) on the legacy default stream, after the caller's kernels there
// (torch's default stream), as fused_adam.cpp.
#include <vector>

#include <ATen/ops/empty.h>

#include "cpu/optim_kernels.h"
#include "zeal/core/error.h"
#include "zeal/features.h"
#include "zeal/optim/cpu_optim.h"
#include "optim/parallel_pieces.h"

#if ZEAL_WITH_CUDA
#include "cuda/unscale_norm.h"
#endif

namespace zeal::optim {
namespace {

double cpu_unscale_and_sum_squares(const at::Tensor& grads, double inv_scale) {
  float* g = grads.data_ptr<float>();
  const kernels::Isa isa = kernels::best_isa();
  std::vector<double> sums(static_cast<size_t>(std::max(1, at::get_num_threads())), 0.0);
  parallel_pieces(grads.numel(), [&](int64_t begin, int64_t end, int64_t t) {
    kernels::UnscaleArgs a;
    a.grads = g + begin;
    a.n = end - begin;
    a.inv_scale = static_cast<float>(inv_scale);
    sums[t] += kernels::unscale_sum_squares(a, isa);
  });
  double total = 0.0;
  for (double s : sums) total += s;  // a fixed order
  return total;
}

}  // namespace

double unscale_and_sum_squares(const at::Tensor& grads, double inv_scale) {
  ZEAL_CHECK(grads.defined() && grads.scalar_type() == at::kFloat && grads.is_contiguous(),
             "unscale_and_sum_squares: expected a contiguous float32 tensor, got ",
             grads.defined() ? c10::toString(grads.scalar_type()) : "an undefined tensor");
  if (grads.device().is_cpu()) return cpu_unscale_and_sum_squares(grads, inv_scale);
#if ZEAL_WITH_CUDA
  if (grads.is_cuda()) {
    auto options = grads.options();
    at::Tensor block_sums = at::empty({kernels::kUnscaleNormMaxBlocks}, options);
    at::Tensor sum_sq = at::empty({1}, options.dtype(at::kDouble));
    cudaError_t err = kernels::unscale_and_norm(grads.data_ptr<float>(), grads.numel(), static_cast<float>(inv_scale),
                                                block_sums.data_ptr<float>(), sum_sq.data_ptr<double>(),
                                                /*legacy default stream*/ nullptr);
    ZEAL_CHECK(err == cudaSuccess, "unscale_and_sum_squares: kernel launch failed: ", cudaGetErrorString(err));
    return sum_sq.item<double>();
  }
#endif
  throw Error("unscale_and_sum_squares: tensors on " + grads.device().str() + " are not supported");
}

}  // namespace zeal::optim
