// ZeRO-Infinity's optimizer swap: this rank's fp32 master weights and optimizer state live in
// swap files under nvme_path, one file per sub-group of `sub_group_size` elements, and only a few
// sub-groups are in host memory at a time.
//
// Threading and overlap: for_each() runs on the caller's thread and visits the sub-groups in order.
// With pipeline_read, the read of sub-group k+1 is in flight while the caller works on k; with
// pipeline_write, the write of k is in flight while the caller works on k+1. Either takes three
// buffer sets (read-ahead, current, write-behind), neither one. The AioEngine's workers move the
// bytes and hash them (Note [Checksums at the I/O edge]); a sub-group is handed to the caller
// only after its checksums match, so a bad read stops the step before that sub-group's values
// are used. Sub-groups visited before the failing one keep their new values.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/offload/aio.h"
#include "zeal/offload/swap_store.h"

namespace zeal::offload {

struct NvmeSwapConfig {
  std::string nvme_path;
  int64_t sub_group_size = 1000000000;  // elements per swap file
  int64_t buffer_count = 4;             // DeepSpeed's key; must cover the tensors of one sub-group
  bool pipeline_read = false;
  bool pipeline_write = false;
  AioConfig aio;
};

class OptimizerSwapper {
 public:
  // num_elements: this rank's owned elements; names: the fp32 tensors each sub-group holds (the
  // master weights first, then the optimizer's state). Raises ConfigError when the host buffers
  // would not fit in available memory, IoError for nvme_path problems and a full disk.
  OptimizerSwapper(const NvmeSwapConfig& config, int64_t num_elements, std::vector<std::string> names);
  ~OptimizerSwapper();

  int64_t num_sub_groups() const { return static_cast<int64_t>(bounds_.size()) - 1; }
  int64_t begin(int64_t k) const { return bounds_[static_cast<size_t>(k)]; }
  int64_t end(int64_t k) const { return bounds_[static_cast<size_t>(k) + 1]; }
  int64_t numel() const { return bounds_.back(); }  // elements over all sub-groups
  const std::vector<std::string>& names() const { return names_; }

  // visit(k, views): views[j] is names()[j] over elements [begin(k), end(k)), fp32, host.
  //   read:       views hold the swapped values (else their contents are undefined: the visitor
  //               fills them, as initialisation and checkpoint loading do);
  //   write_back: what the visitor leaves in the views is swapped out.
  using Visit = std::function<void(int64_t k, std::vector<at::Tensor>& views)>;
  void for_each(const Visit& visit, bool read, bool write_back);

  int64_t host_buffer_bytes() const;
  int64_t swap_bytes() const { return store_->total_bytes(); }
  const std::string& swap_dir() const { return store_->dir(); }

 private:
  struct BufferSet;
  NvmeSwapConfig config_;
  std::vector<std::string> names_;
  std::vector<int64_t> bounds_;         // sub-group k is [bounds_[k], bounds_[k+1])
  int64_t slot_bytes_ = 0;              // one tensor of the largest sub-group, aligned
  std::unique_ptr<SwapStore> store_;
  std::vector<std::unique_ptr<BufferSet>> sets_;
};

}  // namespace zeal::offload
