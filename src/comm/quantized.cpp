#include "zeal/comm/quantized.h"

#include <ATen/ATen.h>

#include "cpu/quantize.h"
#include "zeal/core/error.h"
#include "zeal/features.h"
#if ZEAL_WITH_CUDA
#include "cuda/quantize.h"
#endif

namespace zeal::comm {
namespace {

void check_format(int bits, int64_t block) {
  ZEAL_CHECK(bits == 8 || bits == 4, "quantize: bits must be 8 or 4, got ", bits);
  ZEAL_CHECK(block > 0 && (bits == 8 || block % 2 == 0), "quantize: the block must be a positive",
             bits == 4 ? " even" : "", " number of elements, got ", block);
}

}  // namespace

namespace {
int64_t padded_levels(int64_t numel, int bits) { return (kernels::quantized_bytes(numel, bits) + 3) / 4 * 4; }
}  // namespace

int64_t quantized_scales(int64_t numel, int64_t block) { return kernels::quantized_blocks(numel, block); }

int64_t quantized_wire_bytes(int64_t numel, int bits, int64_t block) {
  check_format(bits, block);
  return padded_levels(numel, bits) + kernels::quantized_blocks(numel, block) * static_cast<int64_t>(sizeof(float));
}

void pack_message(const Quantized& q, at::Tensor message) {
  ZEAL_INTERNAL_ASSERT(message.numel() == quantized_wire_bytes(q.numel, q.bits, q.block), "message of ",
                       message.numel(), " bytes");
  const int64_t levels = padded_levels(q.numel, q.bits);
  message.slice(0, 0, q.q.numel()).copy_(q.q);
  if (levels > q.q.numel()) message.slice(0, q.q.numel(), levels).zero_();
  message.slice(0, levels).copy_(q.scales.view(at::kByte));
}

Quantized view_message(const at::Tensor& message, int64_t numel, int bits, int64_t block) {
  ZEAL_INTERNAL_ASSERT(message.numel() == quantized_wire_bytes(numel, bits, block), "message of ", message.numel(),
                       " bytes");
  const int64_t levels = padded_levels(numel, bits);
  return Quantized{message.slice(0, 0, kernels::quantized_bytes(numel, bits)), message.slice(0, levels).view(at::kFloat),
                   numel, block, bits};
}

Quantized quantize(const at::Tensor& x, int bits, int64_t block, at::Tensor* error, float error_beta) {
  check_format(bits, block);
  ZEAL_CHECK(error_beta >= 0.0f && error_beta < 1.0f, "quantize: error_beta must be in [0, 1), got ", error_beta);
  ZEAL_CHECK(x.is_floating_point(), "quantize: a floating-point tensor is needed, got ", x.scalar_type());
  at::Tensor values = x.contiguous().to(at::kFloat).view({-1});
  const int64_t n = values.numel();
  if (error) {
    ZEAL_CHECK(error->scalar_type() == at::kFloat && error->is_contiguous() && error->numel() == n &&
                   error->device() == x.device(),
               "quantize: the error buffer must be a contiguous fp32 tensor of ", n, " elements on ", x.device(),
               ", got ", error->scalar_type(), " of ", error->numel(), " on ", error->device());
  }
  Quantized out;
  out.numel = n;
  out.block = block;
  out.bits = bits;
  out.q = at::empty({kernels::quantized_bytes(n, bits)}, x.options().dtype(at::kByte));
  out.scales = at::empty({kernels::quantized_blocks(n, block)}, x.options().dtype(at::kFloat));
  float* err = error ? error->data_ptr<float>() : nullptr;
  if (x.device().is_cpu()) {
    kernels::quantize_blocks(values.data_ptr<float>(), err, n, block, bits, out.q.data_ptr<uint8_t>(),
                             out.scales.data_ptr<float>(), error_beta);
    return out;
  }
#if ZEAL_WITH_CUDA
  ZEAL_CHECK(x.is_cuda(), "quantize: a CPU or CUDA tensor is needed, got one on ", x.device());
  cudaError_t status = kernels::quantize_blocks_cuda(values.data_ptr<float>(), err, n, block, bits,
                                                     out.q.data_ptr<uint8_t>(), out.scales.data_ptr<float>(), nullptr,
                                                     error_beta);
  ZEAL_CHECK(status == cudaSuccess, "quantize: kernel failed: ", cudaGetErrorString(status));
  return out;
#else
  ZEAL_CHECK(false, "quantize: a CPU tensor is needed in a build without CUDA, got one on ", x.device());
  return out;
#endif
}

void dequantize(const Quantized& q, at::Tensor& out, bool accumulate) {
  check_format(q.bits, q.block);
  ZEAL_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == q.numel &&
                 out.device() == q.q.device(),
             "dequantize: out must be a contiguous fp32 tensor of ", q.numel, " elements on ", q.q.device(),
             ", got ", out.scalar_type(), " of ", out.numel(), " on ", out.device());
  ZEAL_CHECK(q.q.numel() == kernels::quantized_bytes(q.numel, q.bits) &&
                 q.scales.numel() == kernels::quantized_blocks(q.numel, q.block),
             "dequantize: ", q.q.numel(), " bytes and ", q.scales.numel(), " scales do not describe ", q.numel,
             " elements of ", q.bits, " bits in blocks of ", q.block);
  if (out.device().is_cpu()) {
    kernels::dequantize_blocks(q.q.data_ptr<uint8_t>(), q.scales.data_ptr<float>(), q.numel, q.block, q.bits,
                               out.data_ptr<float>(), accumulate);
    return;
  }
#if ZEAL_WITH_CUDA
  cudaError_t status = kernels::dequantize_blocks_cuda(q.q.data_ptr<uint8_t>(), q.scales.data_ptr<float>(), q.numel,
                                                       q.block, q.bits, out.data_ptr<float>(), accumulate, nullptr);
  ZEAL_CHECK(status == cudaSuccess, "dequantize: kernel failed: ", cudaGetErrorString(status));
#else
  ZEAL_CHECK(false, "dequantize: a CPU tensor is needed in a build without CUDA, got one on ", out.device());
#endif
}

}  // namespace zeal::comm
