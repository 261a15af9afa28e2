// One rank's swap files under nvme_path, written and read whole through the AioEngine.
//
// Note [Swap file lifetime]: each store makes a directory of its own,
//   <nvme_path>/zeal-swap-<host>-<pid>-<counter>/
// and creates its files inside with O_EXCL, so no run ever reads another run's bytes; a file is
// only read after this store wrote it, and what comes back must carry the checksums of what was
// written (Note [Checksums at the I/O edge]). The destructor removes the files and the directory
// (or, at a normal exit, an atexit handler: Python may never destroy the engine). A process killed outright leaves its
// directory behind; the next store made on that host removes directories whose process is gone.
// Space is reserved with fallocate when a file is added, so a full disk is an error before
// training starts, not halfway through a step.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "zeal/offload/aio.h"

namespace zeal::offload {

class SwapStore {
 public:
  // `purpose` names the store in messages ("optimizer state"). Raises IoError when nvme_path is
  // missing, not a directory or not writable.
  SwapStore(const std::string& nvme_path, const std::string& purpose, const AioConfig& aio);
  ~SwapStore();
  SwapStore(const SwapStore&) = delete;
  SwapStore& operator=(const SwapStore&) = delete;

  // Raises IoError unless the file system under nvme_path has `bytes` free.
  void check_free_space(int64_t bytes) const;
  // A new file of `bytes` (a multiple of kIoAlignment), its space reserved now. Returns its index.
  int64_t add_file(const std::string& name, int64_t bytes);

  // Whole-file transfers. After a write's handle completes, finish_write records its checksums;
  // after a read's, finish_read compares them (IoError naming the file on a mismatch).
  IoHandle write(int64_t file, const void* buffer);
  IoHandle read(int64_t file, void* buffer);
  void finish_write(int64_t file, const IoHandle& handle);
  void finish_read(int64_t file, const IoHandle& handle);
  // The same for a region of a file (aligned offset and size). Regions are read back exactly as
  // they were written: the checksums are kept per region, keyed by offset.
  IoHandle write(int64_t file, const void* buffer, int64_t bytes, int64_t offset);
  IoHandle read(int64_t file, void* buffer, int64_t bytes, int64_t offset);
  void finish_write(int64_t file, int64_t offset, const IoHandle& handle);
  void finish_read(int64_t file, int64_t offset, const IoHandle& handle);

  const std::string& dir() const { return dir_; }
  const std::string& path(int64_t file) const { return files_[static_cast<size_t>(file)].path; }
  int64_t file_bytes(int64_t file) const { return files_[static_cast<size_t>(file)].bytes; }
  int64_t total_bytes() const;
  // Closes and removes the files and the directory now (the destructor, or exit).
  void remove_files();

 private:
  struct File {
    std::string path;
    int fd = -1;
    int64_t bytes = 0;
    // Per written region (by offset): the checksums of its last completed write. A region with
    // none was never written, or its last write failed, and cannot be read.
    std::unordered_map<int64_t, std::vector<uint64_t>> checksums;
  };
  std::string dir_;
  std::string purpose_;
  std::vector<File> files_;
  AioEngine aio_;
};

}  // namespace zeal::offload
