#include "zeal/comm/compressed.h"

#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>

#include "cpu/onebit.h"
#include "zeal/core/error.h"
#include "zeal/features.h"
#if ZEAL_WITH_CUDA
#include "cuda/onebit.h"
#endif

namespace zeal::comm {
namespace {

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// The three kernel calls, on the CPU kernels or (CUDA tensors in a CUDA build) the CUDA ones on
// the legacy default stream, after the caller's work on torch's default stream.
double scale_of(const at::Tensor& x, const at::Tensor& error, int64_t n_valid) {
  if (x.device().is_cpu()) return kernels::onebit_scale(x.data_ptr<float>(), error.data_ptr<float>(), n_valid);
  if (n_valid == 0) return 0.0;
  at::Tensor c = x.slice(0, 0, n_valid).add(error.slice(0, 0, n_valid));
  return std::sqrt(c.to(at::kDouble).pow(2).sum().item<double>() / static_cast<double>(n_valid));
}

void pack(const at::Tensor& x, at::Tensor& error, float scale, at::Tensor& bits, int64_t n_valid, int64_t n_total) {
  if (x.device().is_cpu()) {
    kernels::onebit_pack(x.data_ptr<float>(), error.data_ptr<float>(), scale, bits.data_ptr<uint8_t>(), n_valid,
                         n_total);
    return;
  }
#if ZEAL_WITH_CUDA
  cudaError_t err = kernels::onebit_pack_cuda(x.data_ptr<float>(), error.data_ptr<float>(), scale,
                                              bits.data_ptr<uint8_t>(), n_valid, n_total, nullptr);
  ZEAL_CHECK_AS(CommError, err == cudaSuccess, "compressed_all_reduce: pack kernel failed: ", cudaGetErrorString(err));
#endif
}

void unpack(const uint8_t* bits, float scale, float* out, int64_t n, bool accumulate, bool on_cpu) {
  if (on_cpu) {
    kernels::onebit_unpack(bits, scale, out, n, accumulate);
    return;
  }
#if ZEAL_WITH_CUDA
  cudaError_t err = kernels::onebit_unpack_cuda(bits, scale, out, n, accumulate, nullptr);
  ZEAL_CHECK_AS(CommError, err == cudaSuccess, "compressed_all_reduce: unpack kernel failed: ", cudaGetErrorString(err));
#endif
}

}  // namespace

int64_t compressed_all_reduce_bytes(int64_t numel, int world) {
  const int64_t padded = round_up(std::max<int64_t>(numel, 1), 8 * static_cast<int64_t>(world));
  const int64_t chunk = padded / world;
  // all_to_all of the worker signs (the own chunk stays), all_gather of the server signs, and
  // one float per rank in each of the two scale gathers.
  return (padded - chunk) / 8 + (world - 1) * (chunk / 8) + 2 * (world - 1) * static_cast<int64_t>(sizeof(float));
}

void compressed_all_reduce(Communicator& comm, at::Tensor& tensor, OneBitState& state, Timeout timeout) {
  ZEAL_CHECK(tensor.defined() && tensor.scalar_type() == at::kFloat && tensor.is_contiguous(),
             "compressed_all_reduce: expected a contiguous float32 tensor, got ",
             tensor.defined() ? c10::toString(tensor.scalar_type()) : "an undefined tensor");
  const bool on_cpu = tensor.device().is_cpu();
  ZEAL_CHECK(on_cpu || (ZEAL_WITH_CUDA && tensor.is_cuda()), "compressed_all_reduce: tensors on ",
             tensor.device().str(), " are not supported");
  const int world = comm.size(), rank = comm.rank();
  const int64_t n = tensor.numel();
  const int64_t padded = round_up(std::max<int64_t>(n, 1), 8 * static_cast<int64_t>(world));
  const int64_t chunk = padded / world, chunk_bytes = chunk / 8;
  auto floats = at::TensorOptions().dtype(at::kFloat).device(tensor.device());
  auto bytes = floats.dtype(at::kByte);
  if (state.numel != n || state.world != world || state.worker_error.device() != tensor.device()) {
    state.worker_error = at::zeros({padded}, floats);
    state.server_error = at::zeros({chunk}, floats);
    state.numel = n;
    state.world = world;
  }

  // 1. This rank as a worker.
  at::Tensor signs = at::empty({padded / 8}, bytes);
  const float worker_scale = static_cast<float>(scale_of(tensor, state.worker_error, n));
  pack(tensor, state.worker_error, worker_scale, signs, n, padded);

  // 2. Chunk j of every rank's signs to rank j; everyone's scale to everyone.
  at::Tensor received = at::empty({padded / 8}, bytes);
  at::Tensor scale = at::full({1}, worker_scale, floats);
  at::Tensor scales = at::empty({world}, floats);
  WorkPtr signs_work = comm.all_to_all(received, signs, {timeout});
  WorkPtr scales_work = comm.all_gather(scales, scale, {timeout});
  signs_work->wait();
  scales_work->wait();
  const at::Tensor host_scales = scales.cpu();

  // 3. This rank as the server of chunk `rank`: the average of the decoded chunks, compressed again.
  at::Tensor average = at::zeros({chunk}, floats);
  for (int j = 0; j < world; ++j)
    unpack(received.data_ptr<uint8_t>() + j * chunk_bytes, host_scales.data_ptr<float>()[j],
           average.data_ptr<float>(), chunk, true, on_cpu);
  average.mul_(1.0f / static_cast<float>(world));
  const int64_t valid = std::clamp<int64_t>(n - rank * chunk, 0, chunk);
  at::Tensor server_signs = at::empty({chunk_bytes}, bytes);
  const float server_scale = static_cast<float>(scale_of(average, state.server_error, valid));
  pack(average, state.server_error, server_scale, server_signs, valid, chunk);

  // 4. Every server's chunk to everyone, decoded into the tensor.
  at::Tensor all_signs = at::empty({padded / 8}, bytes);
  at::Tensor server_scale_t = at::full({1}, server_scale, floats);
  at::Tensor server_scales = at::empty({world}, floats);
  signs_work = comm.all_gather(all_signs, server_signs, {timeout});
  scales_work = comm.all_gather(server_scales, server_scale_t, {timeout});
  signs_work->wait();
  scales_work->wait();
  const at::Tensor host_server_scales = server_scales.cpu();
  for (int j = 0; j < world; ++j) {
    const int64_t begin = j * chunk, count = std::clamp<int64_t>(n - begin, 0, chunk);
    if (count > 0)
      unpack(all_signs.data_ptr<uint8_t>() + j * chunk_bytes, host_server_scales.data_ptr<float>()[j],
             tensor.data_ptr<float>() + begin, count, false, on_cpu);
  }
}

}  // namespace zeal::comm
