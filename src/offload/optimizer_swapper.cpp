#include "zeal/offload/optimizer_swapper.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include <ATen/ATen.h>

#include "zeal/core/error.h"
#include "zeal/core/logging.h"

namespace zeal::offload {
namespace {

int64_t available_memory_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return INT64_MAX;  // unknown: no check
}

}  // namespace

// One sub-group's tensors in host memory, kIoAlignment-aligned for O_DIRECT.
struct OptimizerSwapper::BufferSet {
  explicit BufferSet(int64_t bytes) : bytes(bytes) {
    data = static_cast<char*>(std::aligned_alloc(kIoAlignment, static_cast<size_t>(std::max<int64_t>(bytes, kIoAlignment))));
    if (!data) throw std::bad_alloc();
  }
  ~BufferSet() { std::free(data); }
  char* data = nullptr;
  int64_t bytes = 0;
};

OptimizerSwapper::OptimizerSwapper(const NvmeSwapConfig& config, int64_t num_elements, std::vector<std::string> names)
    : config_(config), names_(std::move(names)) {
  ZEAL_CHECK_AS(ConfigError, config.buffer_count >= static_cast<int64_t>(names_.size()),
                "config key 'zero_optimization.offload_optimizer.buffer_count': expected at least ", names_.size(),
                " (one buffer per swapped tensor: ", names_.size(), " for this optimizer), got ", config.buffer_count);
  const int64_t group = std::max<int64_t>(1, std::min(config.sub_group_size, num_elements));
  for (int64_t b = 0; b < num_elements; b += group) bounds_.push_back(b);
  bounds_.push_back(num_elements);
  if (bounds_.size() == 1) bounds_.push_back(0);  // no elements: one empty sub-group
  slot_bytes_ = align_up(group * static_cast<int64_t>(sizeof(float)));
  const int64_t set_bytes = slot_bytes_ * static_cast<int64_t>(names_.size());
  const int64_t sets = (config.pipeline_read || config.pipeline_write) ? std::min<int64_t>(3, num_sub_groups()) : 1;

  // Host memory is accounted before anything is allocated: too much is a message, not the OOM killer.
  const int64_t need = sets * set_bytes, have = available_memory_bytes();
  if (need > have)
    throw ConfigError("config key 'zero_optimization.sub_group_size': the NVMe swap buffers need " + format_bytes(need) + " (" +
                      std::to_string(sets) + " buffer sets x " + std::to_string(names_.size()) + " tensors x " +
                      std::to_string(group) + " elements x 4 bytes) but the machine has " + format_bytes(have) +
                      " available; lower sub_group_size (or turn off pipeline_read / pipeline_write)");

  store_ = std::make_unique<SwapStore>(config.nvme_path, "optimizer state", config.aio);
  // Sub-group k's file: each of its tensors, aligned, one after another.
  auto file_bytes = [&](int64_t k) {
    return align_up((end(k) - begin(k)) * static_cast<int64_t>(sizeof(float))) * static_cast<int64_t>(names_.size());
  };
  int64_t total = 0;
  for (int64_t k = 0; k < num_sub_groups(); ++k) total += file_bytes(k);
  store_->check_free_space(total);
  for (int64_t k = 0; k < num_sub_groups(); ++k) store_->add_file("optimizer_" + std::to_string(k) + ".swp", file_bytes(k));
  for (int64_t s = 0; s < sets; ++s) sets_.push_back(std::make_unique<BufferSet>(set_bytes));
  log("offload", LogLevel::kInfo, "optimizer state swapped to ", store_->dir(), ": ", num_sub_groups(),
      " sub-groups of up to ", group, " elements, ", format_bytes(total), " on disk, ", format_bytes(need), " of host buffers");
}

OptimizerSwapper::~OptimizerSwapper() = default;

int64_t OptimizerSwapper::host_buffer_bytes() const {
  int64_t total = 0;
  for (const auto& s : sets_) total += s->bytes;
  return total;
}

void OptimizerSwapper::for_each(const Visit& visit, bool read, bool write_back) {
  const int64_t groups = num_sub_groups();
  const int64_t sets = static_cast<int64_t>(sets_.size());
  std::vector<IoHandle> reads(static_cast<size_t>(groups)), writes(static_cast<size_t>(groups));
  std::vector<int64_t> writing(static_cast<size_t>(sets), -1);  // the sub-group a set is being written from

  auto finish_write_of_set = [&](int64_t s) {
    int64_t k = writing[static_cast<size_t>(s)];
    writing[static_cast<size_t>(s)] = -1;
    if (k >= 0) store_->finish_write(k, writes[static_cast<size_t>(k)]);
  };
  auto start_read = [&](int64_t k) {
    finish_write_of_set(k % sets);  // the set's previous sub-group must be on disk before it is overwritten
    if (read) reads[static_cast<size_t>(k)] = store_->read(k, sets_[static_cast<size_t>(k % sets)]->data);
  };

  try {
    if (groups > 0) start_read(0);
    for (int64_t k = 0; k < groups; ++k) {
      if (config_.pipeline_read && k + 1 < groups) start_read(k + 1);
      if (read) store_->finish_read(k, reads[static_cast<size_t>(k)]);
      const int64_t s = k % sets;
      const int64_t n = end(k) - begin(k);
      const int64_t stride = align_up(n * static_cast<int64_t>(sizeof(float)));
      std::vector<at::Tensor> views;
      for (size_t j = 0; j < names_.size(); ++j)
        views.push_back(at::from_blob(sets_[static_cast<size_t>(s)]->data + static_cast<int64_t>(j) * stride, {n},
                                      at::TensorOptions().dtype(at::kFloat)));
      visit(k, views);
      if (write_back) {
        writes[static_cast<size_t>(k)] = store_->write(k, sets_[static_cast<size_t>(s)]->data);
        writing[static_cast<size_t>(s)] = k;
        if (!config_.pipeline_write) finish_write_of_set(s);
      }
      if (!config_.pipeline_read && k + 1 < groups) start_read(k + 1);
    }
    for (int64_t s = 0; s < sets; ++s) finish_write_of_set(s);
  } catch (...) {
    // The workers may still be moving bytes in or out of the buffers: let them finish first.
    for (auto* handles : {&reads, &writes})
      for (IoHandle& h : *handles) {
        if (!h) continue;
        try {
          h->wait();
        } catch (...) {
        }
      }
    for (int64_t s = 0; s < sets; ++s) {
      try {
        finish_write_of_set(s);  // a completed write is trusted again; a failed one stays unreadable
      } catch (...) {
      }
    }
    throw;
  }
}

}  // namespace zeal::offload
