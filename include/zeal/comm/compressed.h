// Error-compensated 1-bit all-reduce: the collective under 1-bit Adam, 0/1 Adam and 1-bit LAMB.
//
// The algorithm (DeepSpeed's compressed_allreduce; Tang et al., "1-bit Adam", 2021), for a
// tensor of n elements on W ranks, padded to a multiple of 8 * W and cut into W chunks:
//   1. worker: compress tensor + worker_error to signs and one scale (kernels/cpu/onebit.h); the
//      compression's loss becomes the new worker_error;
//   2. all_to_all the packed signs (chunk j to rank j) and all_gather the W worker scales;
//   3. server (rank r for chunk r): the average over ranks of scale_j * sign_j, compressed again
//      with server_error, whose loss becomes the new server_error;
//   4. all_gather the server signs and scales; every rank decodes the whole tensor.
// The result, written in place, is every rank's same estimate of the average of the tensors. Each
// rank sends n / 8 + n / (8 W) bytes and 2 floats instead of fp32 all-reduce's ~2 n * 4 (W-1) / W.
// The two error buffers live in OneBitState and persist across calls: one state per tensor that is
// reduced this way. Synchronous: it returns when the result is in place (each op is bounded by the
// communicator's timeout, so a missing rank is a TimeoutError naming it, never a hang).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "zeal/comm/communicator.h"

namespace zeal::comm {

struct OneBitState {
  at::Tensor worker_error;  // padded n, fp32
  at::Tensor server_error;  // one chunk, fp32
  int64_t numel = -1;       // the tensor size the buffers were made for
  int64_t world = 0;
  void reset() { *this = OneBitState(); }
};

// Bytes one rank sends in one compressed_all_reduce of n elements over W ranks.
int64_t compressed_all_reduce_bytes(int64_t numel, int world);

// In place, fp32, contiguous, on the CPU (or a CUDA device in a CUDA build). The state's buffers
// are (re)made when the size, the world or the device changes, starting from zero error.
void compressed_all_reduce(Communicator& comm, at::Tensor& tensor, OneBitState& state, Timeout timeout = Timeout{0});

}  // namespace zeal::comm
