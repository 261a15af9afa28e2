// 1-bit compression with error feedback (1-bit Adam's compressed all-reduce, comm/compressed.h).
// A leaf: pointers and sizes only, no torch headers.
//
// A tensor x is sent as its signs and one scale: with c = x + error (the error this rank carried
// over from its last compression), scale = ||c||_2 / sqrt(n) and the value received is
// scale * sign(c); the new error is what that lost, c - scale * sign(c), added next time. Signs are
// packed 8 to a byte, element 8b + k in bit k of byte b (least significant first); sign(0) is +1.
// Elements at or past n_valid (padding to a multiple of 8 and of the rank count) are zero: they do
// not count in the scale and keep no error.
#pragma once

#include <cstdint>

namespace zeal::kernels {

// sqrt(sum over i < n_valid of (x[i] + error[i])^2 / n_valid), accumulated in double; 0 when
// n_valid is 0.
double onebit_scale(const float* x, const float* error, int64_t n_valid);

// bits (n_total / 8 bytes; n_total a multiple of 8) <- signs of c = x + error; error <- c - scale *
// sign(c) below n_valid and 0 from there. x and error may be the same buffer only if x is not
// needed afterwards (it is read before error is written, element by element).
void onebit_pack(const float* x, float* error, float scale, uint8_t* bits, int64_t n_valid, int64_t n_total);

// out[i] = scale * (bit i ? 1 : -1) for i < n, or out[i] += that with accumulate.
void onebit_unpack(const uint8_t* bits, float scale, float* out, int64_t n, bool accumulate);

}  // namespace zeal::kernels
