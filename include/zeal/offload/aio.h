// Asynchronous file I/O for NVMe offload: io_uring (liburing) under a small pool of worker
// threads, O_DIRECT transfers from aligned host buffers.
//
// Threading: `thread_count` workers, each owning one io_uring ring of `queue_depth` entries. A
// request (one contiguous buffer <-> one file range) is cut into `thread_count` parts on block
// boundaries; worker t runs part t, keeping up to queue_depth block-sized operations in flight.
// The caller's thread only enqueues and later waits on the handle, so it computes while the
// workers move bytes (the optimizer steps sub-group k while k+1 is read and k-1 written).
//
// Note [Checksums at the I/O edge]: a worker hashes (XXH3-64) each block it writes just before
// submitting it, and each block it reads as it completes, so hashing runs on the I/O threads and
// overlaps the blocks still in flight rather than costing the caller's thread a pass. The swap store keeps the hashes
// of what it wrote and compares them with what it reads back: a swap file changed underneath, a
// stale file or a torn write is an error before its bytes reach the optimizer.
//
// Errors: every failure is an IoError naming the operation, the file, the offset and the
// system's reason ("No space left on device"); a read that returns fewer bytes than asked (the
// file shrank) is an error too. The handle carries the error to whoever waits on it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "zeal/core/config.h"

namespace zeal::offload {

using AioConfig = zeal::AioConfig;  // the `aio` config section (core/config.h)

// The alignment O_DIRECT asks of buffer addresses, file offsets and lengths.
constexpr int64_t kIoAlignment = 4096;
inline int64_t align_up(int64_t n) { return (n + kIoAlignment - 1) / kIoAlignment * kIoAlignment; }

// One request in flight. wait() blocks until every part finished and rethrows its IoError.
class IoRequest {
 public:
  virtual ~IoRequest() = default;
  virtual void wait() = 0;
  virtual bool done() const = 0;
  // XXH3-64 of each block (Note [Checksums at the I/O edge]); valid after wait().
  virtual const std::vector<uint64_t>& checksums() const = 0;
};
using IoHandle = std::shared_ptr<IoRequest>;

class AioEngine {
 public:
  explicit AioEngine(const AioConfig& config);
  ~AioEngine();  // waits for requests in flight
  AioEngine(const AioEngine&) = delete;
  AioEngine& operator=(const AioEngine&) = delete;

  // `buffer` is kIoAlignment-aligned; `bytes` and `offset` are multiples of kIoAlignment. `path`
  // is for messages. The buffer must stay alive and untouched until the handle completes.
  IoHandle read(int fd, const std::string& path, void* buffer, int64_t bytes, int64_t offset);
  IoHandle write(int fd, const std::string& path, const void* buffer, int64_t bytes, int64_t offset);

  const AioConfig& config() const { return config_; }

 private:
  struct Impl;
  AioConfig config_;
  std::unique_ptr<Impl> impl_;
};

// The checksum of a part as the workers compute it: for callers that hash what they will write.
uint64_t checksum(const void* data, int64_t bytes);

// "24.0 KiB", "1.50 GiB": sizes in messages.
std::string format_bytes(int64_t bytes);

}  // namespace zeal::offload
