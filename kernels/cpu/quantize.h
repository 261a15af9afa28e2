// Block-wise symmetric quantization: ZeRO++'s wire format for weights (qwZ, 8 bits) and gradients
// (qgZ, 4 bits). A leaf: pointers and sizes only, no torch headers.
//
// x[0, n) is cut into blocks of `block` elements, the last one possibly shorter. Block b has one
// fp32 scale s_b = amax_b / qmax, amax_b the largest |x| in the block and qmax = 2^(bits-1) - 1
// (127 or 7), and each element is sent as q = clamp(round_half_even(x * (qmax / amax_b)), -qmax,
// qmax); the value received is q * s_b. A block of zeros has scale 0 and sends zeros; a block
// holding a NaN or an infinity has scale NaN (it arrives as NaNs, so an overflow check downstream
// still sees it), zero levels, and keeps its error unchanged. 8 bits: one int8 per element.
// 4 bits: two per byte, element 2j in the low nibble of byte j and 2j+1 in the high one, each a
// two's-complement nibble; an odd n leaves the last high nibble 0. With 4 bits the block is even,
// so no byte straddles two blocks.
//
// With error feedback (`error` not null) the block quantizes c = x + error instead, and error
// becomes what the quantization lost, r = c - q * s_b, to be added next time. With error_beta
// beta > 0 it becomes the moving average (beta * error) + ((1 - beta) * r) instead (LoCo, qgZ's
// zeropp_loco_param; 1 - beta rounded to fp32 first); beta 0 is plain error feedback. Every
// operation is rounded as written (no fused multiply-add), so the CUDA kernels (cuda/quantize.h)
// give bitwise the same bytes, scales and errors.
#pragma once

#include <cstdint>

namespace zeal::kernels {

inline int64_t quantized_blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }
inline int64_t quantized_bytes(int64_t n, int bits) { return bits == 8 ? n : (n + 1) / 2; }

// q (quantized_bytes(n, bits) bytes) and scales (quantized_blocks(n, block) floats) <- x[0, n).
// bits is 8 or 4; block > 0, and even for 4 bits. error (n floats) may be null; error_beta in [0, 1).
void quantize_blocks(const float* x, float* error, int64_t n, int64_t block, int bits, uint8_t* q, float* scales,
                     float error_beta = 0.0f);

// out[i] = q_i * s_(i / block) for i < n, or out[i] += that with accumulate.
void dequantize_blocks(const uint8_t* q, const float* scales, int64_t n, int64_t block, int bits, float* out,
                       bool accumulate);

}  // namespace zeal::kernels
