// ZeRO++'s quantized wire format over tensors: the adapter between at::Tensor and the block
// quantization kernels (kernels/cpu/quantize.h, kernels/cuda/quantize.h, where the format is
// defined). qwZ sends weights as 8-bit blocks before the stage-3 all-gather; qgZ sends gradients as
// 4-bit blocks in its all-to-all reduction (with LoCo's error feedback when zeropp_loco_param is set).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace zeal::comm {

// Elements per block: qwZ's 8-bit weights (DeepSpeed groups a parameter into blocks of about
// 4-8K elements; smaller blocks are at least as accurate).
constexpr int64_t kWeightBlock = 2048;
// Elements per block: qgZ's 4-bit gradients (seven levels a side: small blocks keep the error down).
constexpr int64_t kGradientBlock = 256;

struct Quantized {
  at::Tensor q;       // uint8: quantized_bytes(numel, bits)
  at::Tensor scales;  // fp32: one per block
  int64_t numel = 0;
  int64_t block = 0;
  int bits = 0;
};

// x (any floating dtype, contiguous; computed in fp32) quantized in blocks of `block` elements. With
// error (fp32, x's size and device), the blocks carry error feedback and error is updated in place;
// error_beta > 0 makes it LoCo's moving average (kernels/cpu/quantize.h). bits must be 8 or 4, block
// positive (and even for 4 bits), error_beta in [0, 1); the check names what was given.
Quantized quantize(const at::Tensor& x, int bits, int64_t block, at::Tensor* error = nullptr, float error_beta = 0.0f);

// The fp32 values q stands for, written into out (fp32, contiguous, numel elements) or added to it.
void dequantize(const Quantized& q, at::Tensor& out, bool accumulate = false);

// One quantized tensor as one message on the wire: its levels, padded to a multiple of 4 bytes,
// then its block scales (fp32, so aligned). Messages of one size can be concatenated and exchanged
// with one collective (qwZ's gathers, qgZ's all-to-alls).
int64_t quantized_wire_bytes(int64_t numel, int bits, int64_t block);
// Scales (blocks) of numel elements quantized in blocks of `block`.
int64_t quantized_scales(int64_t numel, int64_t block);
// message (uint8, quantized_wire_bytes(q.numel, q.bits, q.block)) <- q.
void pack_message(const Quantized& q, at::Tensor message);
// The Quantized a message holds, as views into it.
Quantized view_message(const at::Tensor& message, int64_t numel, int bits, int64_t block);

}  // namespace zeal::comm
