// The io_uring worker pool of offload/aio.h. Should a ring fail to set up (a kernel or sandbox
// without io_uring), its worker falls back to pread/pwrite, slower but the same contract, and says
// so once in the `offload` log.
#include "zeal/offload/aio.h"

#include <liburing.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdio>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "zeal/core/error.h"
#include "zeal/core/logging.h"

namespace zeal::offload {
namespace {

struct Request final : IoRequest {
  bool is_write = false;
  int fd = -1;
  std::string path;
  mutable std::mutex mu;
  std::condition_variable cv;
  int pending = 0;
  std::string error;
  std::vector<uint64_t> sums;

  void wait() override {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return pending == 0; });
    if (!error.empty()) throw IoError(error);
  }
  bool done() const override {
    std::lock_guard<std::mutex> lock(mu);
    return pending == 0;
  }
  const std::vector<uint64_t>& checksums() const override { return sums; }
};

struct Part {
  std::shared_ptr<Request> request;
  size_t first_block = 0;  // of the request: where this part's checksums go
  char* buffer = nullptr;
  int64_t bytes = 0;
  int64_t offset = 0;
};

std::string describe(const Part& p, int64_t offset, int64_t bytes) {
  return std::string(p.request->is_write ? "write to " : "read of ") + p.request->path + " at offset " +
         std::to_string(offset) + " (" + std::to_string(bytes) + " bytes)";
}

std::string short_message(const Part& p, int64_t offset, int64_t want, int64_t got) {
  if (p.request->is_write)
    return "short " + describe(p, offset, want) + ": " + std::to_string(got) + " bytes written (is the disk full?)";
  return "short " + describe(p, offset, want) + ": " + std::to_string(got) +
         " bytes read; the swap file is shorter than Zeal wrote it (changed underneath?)";
}

}  // namespace

uint64_t checksum(const void* data, int64_t bytes) { return XXH3_64bits(data, static_cast<size_t>(bytes)); }

std::string format_bytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  char text[32];
  if (b < 1024.0 * 1024.0)
    std::snprintf(text, sizeof(text), "%.1f KiB", b / 1024.0);
  else if (b < 1024.0 * 1024.0 * 1024.0)
    std::snprintf(text, sizeof(text), "%.1f MiB", b / (1024.0 * 1024.0));
  else
    std::snprintf(text, sizeof(text), "%.2f GiB", b / (1024.0 * 1024.0 * 1024.0));
  return text;
}

struct AioEngine::Impl {
  struct Worker {
    std::thread thread;
    io_uring ring{};
    bool has_ring = false;
    std::deque<Part> queue;
    std::mutex mu;
    std::condition_variable cv;
    bool stop = false;
  };
  AioConfig config;
  std::vector<std::unique_ptr<Worker>> workers;

  explicit Impl(const AioConfig& c) : config(c) {
    for (int64_t t = 0; t < config.thread_count; ++t) {
      auto w = std::make_unique<Worker>();
      int rc = io_uring_queue_init(static_cast<unsigned>(config.queue_depth), &w->ring, 0);
      w->has_ring = rc == 0;
      if (!w->has_ring && t == 0)
        log("offload", LogLevel::kWarn, "io_uring is not available (", std::strerror(-rc),
            "); swap I/O falls back to pread/pwrite");
      Worker* raw = w.get();
      w->thread = std::thread([this, raw] { run(*raw); });
      workers.push_back(std::move(w));
    }
  }

  ~Impl() {
    for (auto& w : workers) {
      {
        std::lock_guard<std::mutex> lock(w->mu);
        w->stop = true;
      }
      w->cv.notify_one();
    }
    for (auto& w : workers) {
      w->thread.join();
      if (w->has_ring) io_uring_queue_exit(&w->ring);
    }
  }

  void run(Worker& w) {
    for (;;) {
      Part part;
      {
        std::unique_lock<std::mutex> lock(w.mu);
        w.cv.wait(lock, [&] { return w.stop || !w.queue.empty(); });
        if (w.queue.empty()) return;  // stop, nothing left
        part = std::move(w.queue.front());
        w.queue.pop_front();
      }
      Request& r = *part.request;
      std::string error = w.has_ring ? transfer_uring(w.ring, part) : transfer_sync(part);
      {
        std::lock_guard<std::mutex> lock(r.mu);
        if (!error.empty() && r.error.empty()) r.error = error;
        --r.pending;
      }
      r.cv.notify_all();
    }
  }

  // Each block is hashed where its bytes are at hand: a write's before it is submitted, a read's
  // when it completes, so hashing overlaps the blocks still in flight. Parts write disjoint
  // elements of the request's checksum vector.
  void hash_block(const Part& p, int64_t block) {
    const int64_t off = block * config.block_size, n = std::min(config.block_size, p.bytes - off);
    p.request->sums[p.first_block + static_cast<size_t>(block)] = checksum(p.buffer + off, n);
  }

  std::string transfer_sync(const Part& p) {
    int64_t done = 0;
    while (done < p.bytes) {
      const int64_t n = std::min(config.block_size, p.bytes - done);
      if (p.request->is_write) hash_block(p, done / config.block_size);
      ssize_t rc = p.request->is_write ? ::pwrite(p.request->fd, p.buffer + done, n, p.offset + done)
                                       : ::pread(p.request->fd, p.buffer + done, n, p.offset + done);
      if (rc < 0 && errno == EINTR) continue;
      if (rc < 0) return describe(p, p.offset + done, n) + " failed: " + std::strerror(errno);
      if (rc < n) return short_message(p, p.offset + done, n, rc);
      if (!p.request->is_write) hash_block(p, done / config.block_size);
      done += n;
    }
    return {};
  }

  // Blocks of block_size bytes, up to queue_depth in flight. A failed block stops new submissions;
  // the ones in flight are reaped before returning, since they still point into the buffer.
  std::string transfer_uring(io_uring& ring, const Part& p) {
    const int64_t bs = config.block_size;
    const int64_t blocks = (p.bytes + bs - 1) / bs;
    int64_t next = 0, in_flight = 0;
    std::string error;
    auto prep = [&](int64_t block) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      ZEAL_INTERNAL_ASSERT(sqe != nullptr, "io_uring submission queue full");
      const int64_t off = block * bs, n = std::min(bs, p.bytes - off);
      if (p.request->is_write) hash_block(p, block);
      if (p.request->is_write)
        io_uring_prep_write(sqe, p.request->fd, p.buffer + off, static_cast<unsigned>(n), p.offset + off);
      else
        io_uring_prep_read(sqe, p.request->fd, p.buffer + off, static_cast<unsigned>(n), p.offset + off);
      io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(block));
      ++in_flight;
      if (config.single_submit) io_uring_submit(&ring);
    };
    while ((next < blocks && error.empty()) || in_flight > 0) {
      const bool refill = config.overlap_events || in_flight == 0;
      int64_t added = 0;
      while (refill && error.empty() && next < blocks && in_flight < config.queue_depth) {
        prep(next++);
        ++added;
      }
      if (added && !config.single_submit) io_uring_submit(&ring);
      io_uring_cqe* cqe = nullptr;
      int rc = io_uring_wait_cqe(&ring, &cqe);
      if (rc == -EINTR) continue;
      if (rc < 0) {  // the ring itself failed: nothing more will complete
        return describe(p, p.offset, p.bytes) + ": io_uring wait failed: " + std::strerror(-rc);
      }
      const int64_t block = static_cast<int64_t>(io_uring_cqe_get_data64(cqe));
      const int res = cqe->res;
      io_uring_cqe_seen(&ring, cqe);
      --in_flight;
      const int64_t off = block * bs, n = std::min(bs, p.bytes - off);
      if (res == -EINTR || res == -EAGAIN) {
        if (error.empty()) prep(block), io_uring_submit(&ring);
        continue;
      }
      if (!error.empty()) continue;
      if (res < 0)
        error = describe(p, p.offset + off, n) + " failed: " + std::strerror(-res);
      else if (res < n)
        error = short_message(p, p.offset + off, n, res);
      else if (!p.request->is_write)
        hash_block(p, block);
    }
    return error;
  }

  IoHandle submit(bool is_write, int fd, const std::string& path, char* buffer, int64_t bytes, int64_t offset) {
    ZEAL_CHECK(reinterpret_cast<uintptr_t>(buffer) % kIoAlignment == 0 && bytes % kIoAlignment == 0 &&
                   offset % kIoAlignment == 0,
               "swap I/O on ", path, " needs ", kIoAlignment, "-byte aligned buffers, sizes and offsets");
    auto r = std::make_shared<Request>();
    r->is_write = is_write;
    r->fd = fd;
    r->path = path;
    // Parts on block boundaries, as even as blocks allow; a request smaller than the pool uses fewer.
    const int64_t bs = config.block_size;
    const int64_t blocks = (bytes + bs - 1) / bs;
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(config.thread_count, blocks));
    r->sums.assign(static_cast<size_t>(std::max<int64_t>(blocks, 1)), 0);
    r->pending = static_cast<int>(parts);
    int64_t begin_block = 0;
    for (int64_t t = 0; t < parts; ++t) {
      const int64_t end_block = blocks * (t + 1) / parts;
      Part part;
      part.request = r;
      part.first_block = static_cast<size_t>(begin_block);
      part.offset = offset + begin_block * bs;
      part.buffer = buffer + begin_block * bs;
      part.bytes = std::min(bytes, end_block * bs) - begin_block * bs;
      begin_block = end_block;
      Worker& w = *workers[static_cast<size_t>(t)];
      {
        std::lock_guard<std::mutex> lock(w.mu);
        w.queue.push_back(std::move(part));
      }
      w.cv.notify_one();
    }
    return r;
  }
};

AioEngine::AioEngine(const AioConfig& config) : config_(config) {
  ZEAL_CHECK_AS(ConfigError, config.block_size > 0 && config.block_size % kIoAlignment == 0,
                "config key 'aio.block_size': expected a positive multiple of ", kIoAlignment,
                " (O_DIRECT transfers), got ", config.block_size);
  ZEAL_CHECK_AS(ConfigError, config.queue_depth >= 1 && config.queue_depth <= 4096,
                "config key 'aio.queue_depth': expected an integer in [1, 4096], got ", config.queue_depth);
  ZEAL_CHECK_AS(ConfigError, config.thread_count >= 1 && config.thread_count <= 64,
                "config key 'aio.thread_count': expected an integer in [1, 64], got ", config.thread_count);
  impl_ = std::make_unique<Impl>(config);
}

AioEngine::~AioEngine() = default;

IoHandle AioEngine::read(int fd, const std::string& path, void* buffer, int64_t bytes, int64_t offset) {
  return impl_->submit(false, fd, path, static_cast<char*>(buffer), bytes, offset);
}

IoHandle AioEngine::write(int fd, const std::string& path, const void* buffer, int64_t bytes, int64_t offset) {
  return impl_->submit(true, fd, path, static_cast<char*>(const_cast<void*>(buffer)), bytes, offset);
}

}  // namespace zeal::offload
