#include "zeal/offload/param_swapper.h"

#include <cstdlib>

#include <ATen/ATen.h>

#include "zeal/core/error.h"
#include "zeal/core/logging.h"

namespace zeal::offload {

at::Tensor aligned_host_tensor(int64_t numel, at::ScalarType dtype) {
  const int64_t bytes = align_up(std::max<int64_t>(numel, 1) * static_cast<int64_t>(c10::elementSize(dtype)));
  void* data = std::aligned_alloc(kIoAlignment, static_cast<size_t>(bytes));
  if (!data) throw std::bad_alloc();
  return at::from_blob(data, {numel}, [](void* p) { std::free(p); }, at::TensorOptions().dtype(dtype));
}

ParamSwapper::ParamSwapper(const std::string& nvme_path, const AioConfig& aio, at::ScalarType dtype,
                           const std::vector<int64_t>& chunk_sizes)
    : dtype_(dtype), sizes_(chunk_sizes), store_(nvme_path, "parameter", aio) {
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  int64_t total = 0;
  for (int64_t n : sizes_) {
    offsets_.push_back(total);
    total += align_up(n * element);
  }
  store_.check_free_space(total);
  file_ = store_.add_file("params.swp", total);
  log("offload", LogLevel::kInfo, "parameters swapped to ", store_.dir(), ": ", sizes_.size(), " chunks, ",
      format_bytes(total), " on disk");
}

void ParamSwapper::write(size_t i, const at::Tensor& values) {
  ZEAL_INTERNAL_ASSERT(values.numel() == sizes_[i], "chunk ", i, " has ", sizes_[i], " elements, got ",
                       values.numel());
  if (sizes_[i] == 0) return;
  at::Tensor staging = aligned_host_tensor(sizes_[i], dtype_);
  staging.copy_(values.reshape({-1}));
  const int64_t bytes = align_up(static_cast<int64_t>(staging.nbytes()));
  store_.finish_write(file_, offsets_[i], store_.write(file_, staging.data_ptr(), bytes, offsets_[i]));
}

at::Tensor ParamSwapper::read(size_t i) {
  auto [out, handle] = start_read(i);
  finish_read(i, handle);
  return out;
}

std::pair<at::Tensor, IoHandle> ParamSwapper::start_read(size_t i) {
  at::Tensor out = aligned_host_tensor(sizes_[i], dtype_);
  if (sizes_[i] == 0) return {out, nullptr};
  const int64_t bytes = align_up(static_cast<int64_t>(out.nbytes()));
  return {out, store_.read(file_, out.data_ptr(), bytes, offsets_[i])};
}

void ParamSwapper::finish_read(size_t i, const IoHandle& handle) {
  if (handle) store_.finish_read(file_, offsets_[i], handle);
}

void ParamSwapper::patch(size_t i, int64_t begin, const at::Tensor& values) {
  at::Tensor chunk = read(i);
  chunk.slice(0, begin, begin + values.numel()).copy_(values);
  write(i, chunk);
}

}  // namespace zeal::offload
