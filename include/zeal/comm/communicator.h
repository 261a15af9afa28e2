// The Communicator: every collective in Zeal goes through this interface.
//
// Model: c10d's Backend/Work. Each op takes its tensors and one options struct and returns a
// Work handle at once; the op runs asynchronously on the backend's own thread (or stream).
// Work::wait() rethrows the op's error. Every op carries a deadline (its options' timeout, or
// the communicator's default): when it passes, the op fails with TimeoutError naming the op,
// the group and the ranks that never arrived, and the communicator is marked broken so that
// later ops fail at once instead of hanging (see Note [Broken communicators] in mpi_backend.cpp).
#pragma once

#include <chrono>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace zeal::comm {

using Timeout = std::chrono::milliseconds;

enum class ReduceOp { kSum, kAvg, kMax, kMin };
const char* to_string(ReduceOp op);

// A zero timeout in any options struct means "the communicator's default". `site` names the call
// site in the caller's words ("grad bucket 3 round 12"): it is part of the op's signature, which
// the ranks compare (Note [Collective signatures] in mpi_backend.cpp), so two ops that happen to
// have the same kind and size but come from different places are not mistaken for one another.
struct AllReduceOptions {
  ReduceOp op = ReduceOp::kSum;
  Timeout timeout{0};
  std::string site;
};
struct ReduceScatterOptions {
  ReduceOp op = ReduceOp::kSum;
  Timeout timeout{0};
  std::string site;
};
struct AllGatherOptions {
  Timeout timeout{0};
  std::string site;
};
struct BroadcastOptions {
  int root = 0;
  Timeout timeout{0};
  std::string site;
};
struct ReduceOptions {
  int root = 0;
  ReduceOp op = ReduceOp::kSum;
  Timeout timeout{0};
  std::string site;
};
// Uneven exchange (torch's all_to_all_single with split sizes): `input_split_sizes[j]` dim-0 rows
// of the input go to rank j, `output_split_sizes[j]` rows of the output come from rank j, in rank
// order. Both empty: size() equal chunks. The caller keeps the two sides consistent (rank j's
// output_split_sizes[r] == rank r's input_split_sizes[j]); ranks usually learn them first with an
// equal all_to_all of the counts, as zeal.moe does. An uneven exchange's signature is op
// all_to_all_v with the elements of one row as its count, which every rank shares.
struct AllToAllOptions {
  Timeout timeout{0};
  std::string site;
  std::vector<int64_t> input_split_sizes;
  std::vector<int64_t> output_split_sizes;
};
struct SendRecvOptions {
  int tag = 0;
  Timeout timeout{0};
};
struct BarrierOptions {
  Timeout timeout{0};
  std::string site;
};

// The handle of one asynchronous op. Completed exactly once, with or without an error.
class Work {
 public:
  explicit Work(std::string description) : description_(std::move(description)) {}
  virtual ~Work() = default;

  bool is_completed() const;
  // Blocks until the op completes and rethrows its error. The backend enforces the op's own
  // deadline, so this never blocks forever; `timeout` bounds this call's wait only.
  void wait(Timeout timeout = Timeout::max());
  std::exception_ptr exception() const;
  const std::string& description() const { return description_; }

  // Backend side.
  void finish(std::exception_ptr error = nullptr);

 private:
  mutable std::mutex mutex_;
  std::condition_variable done_cv_;
  std::atomic<bool> completed_{false};
  std::exception_ptr error_;
  std::string description_;
};

using WorkPtr = std::shared_ptr<Work>;

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;        // the group's name, e.g. "world", "data[0]"
  virtual const std::string& backend_name() const = 0;  // "mpi", "nccl"
  virtual Timeout default_timeout() const = 0;

  // In place: every rank ends with the reduction of all ranks' `tensor`.
  virtual WorkPtr all_reduce(at::Tensor& tensor, const AllReduceOptions& opts = {}) = 0;
  // input holds size() equal chunks; rank r receives the reduction of chunk r into output.
  virtual WorkPtr reduce_scatter(at::Tensor& output, const at::Tensor& input,
                                 const ReduceScatterOptions& opts = {}) = 0;
  // output holds size() chunks, chunk r being rank r's input.
  virtual WorkPtr all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& opts = {}) = 0;
  virtual WorkPtr broadcast(at::Tensor& tensor, const BroadcastOptions& opts = {}) = 0;
  // In place on the root; other ranks' tensors are left as they were.
  virtual WorkPtr reduce(at::Tensor& tensor, const ReduceOptions& opts = {}) = 0;
  // input and output hold size() equal chunks; chunk j of input goes to rank j, whose output
  // chunk r receives it.
  virtual WorkPtr all_to_all(at::Tensor& output, const at::Tensor& input, const AllToAllOptions& opts = {}) = 0;
  virtual WorkPtr send(const at::Tensor& tensor, int dst, const SendRecvOptions& opts = {}) = 0;
  virtual WorkPtr recv(at::Tensor& tensor, int src, const SendRecvOptions& opts = {}) = 0;
  virtual WorkPtr barrier(const BarrierOptions& opts = {}) = 0;

  // A sub-communicator of the ranks in `ranks` (ranks of this communicator, in group order).
  // Collective over this communicator: every rank calls it, each with the group it belongs to.
  virtual std::shared_ptr<Communicator> split(const std::vector<int>& ranks, const std::string& name) = 0;
};

using CommunicatorPtr = std::shared_ptr<Communicator>;

}  // namespace zeal::comm
