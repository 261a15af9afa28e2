// ZeRO-Infinity's parameter swap (offload_param {device: nvme}, stage 3): this rank's chunk of
// every parameter lives in one swap file under nvme_path, each chunk at an aligned offset of its
// own, in the model's dtype. The stage-3 partition reads a chunk when it gathers the parameter and
// writes it when the optimizer step (or a GatheredParameters modifier) changes it.
//
// Threading: every call runs on the caller's thread; read/write/patch return when their I/O has
// completed, start_read when it is queued. The bytes move on the AioEngine's workers, checksummed
// (Note [Checksums at the I/O edge]).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/offload/aio.h"
#include "zeal/offload/swap_store.h"

namespace zeal::offload {

class ParamSwapper {
 public:
  // chunk_sizes[i]: elements of parameter i's chunk on this rank (0 for none).
  ParamSwapper(const std::string& nvme_path, const AioConfig& aio, at::ScalarType dtype,
               const std::vector<int64_t>& chunk_sizes);

  // Chunk i <- values (chunk_sizes[i] elements of any floating dtype, cast to the model's).
  void write(size_t i, const at::Tensor& values);
  // Chunk i as a new host tensor of the model's dtype.
  at::Tensor read(size_t i);
  // The same in two halves, so the read overlaps the caller's work: start_read returns the buffer
  // being filled and its handle; finish_read waits and checks it (IoError on a mismatch).
  std::pair<at::Tensor, IoHandle> start_read(size_t i);
  void finish_read(size_t i, const IoHandle& handle);
  // Elements [begin, begin + n) of chunk i <- values: a read, a patch and a write.
  void patch(size_t i, int64_t begin, const at::Tensor& values);

  int64_t swap_bytes() const { return store_.total_bytes(); }
  const std::string& swap_dir() const { return store_.dir(); }

 private:
  at::ScalarType dtype_;
  std::vector<int64_t> sizes_, offsets_;
  SwapStore store_;
  int64_t file_ = -1;
};

// A host tensor whose storage is kIoAlignment-aligned (O_DIRECT), freed with the tensor.
at::Tensor aligned_host_tensor(int64_t numel, at::ScalarType dtype);

}  // namespace zeal::offload
