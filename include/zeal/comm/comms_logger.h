// The `comms_logger` config section: a Communicator that forwards every op to the one it wraps and
// counts, per op, the calls and the bytes of the message each call hands the backend (the input
// tensor's size, as DeepSpeed's comms logger records it). The compressed all-reduce shows up as the
// all_to_all and all_gathers it is made of, so its saving is visible next to a plain all_reduce.
// Thread-safe: ops may be issued from the autograd thread and the caller's thread.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "zeal/comm/communicator.h"

namespace zeal::comm {

struct OpCount {
  int64_t calls = 0;
  int64_t bytes = 0;
};

class CountingCommunicator : public Communicator {
 public:
  // ops: the op names to count ("all_reduce", "all_gather", ...); empty counts every op. verbose
  // logs each op (name, bytes) at info level on the `comm` logger.
  CountingCommunicator(CommunicatorPtr inner, std::set<std::string> ops, bool verbose);

  std::map<std::string, OpCount> counts() const;
  void reset();

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  const std::string& name() const override { return inner_->name(); }
  const std::string& backend_name() const override { return inner_->backend_name(); }
  Timeout default_timeout() const override { return inner_->default_timeout(); }

  WorkPtr all_reduce(at::Tensor& tensor, const AllReduceOptions& opts) override;
  WorkPtr reduce_scatter(at::Tensor& output, const at::Tensor& input, const ReduceScatterOptions& opts) override;
  WorkPtr all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& opts) override;
  WorkPtr broadcast(at::Tensor& tensor, const BroadcastOptions& opts) override;
  WorkPtr reduce(at::Tensor& tensor, const ReduceOptions& opts) override;
  WorkPtr all_to_all(at::Tensor& output, const at::Tensor& input, const AllToAllOptions& opts) override;
  WorkPtr send(const at::Tensor& tensor, int dst, const SendRecvOptions& opts) override;
  WorkPtr recv(at::Tensor& tensor, int src, const SendRecvOptions& opts) override;
  WorkPtr barrier(const BarrierOptions& opts) override;
  std::shared_ptr<Communicator> split(const std::vector<int>& ranks, const std::string& name) override;

 private:
  void count(const char* op, const at::Tensor& message);

  CommunicatorPtr inner_;
  std::set<std::string> ops_;
  bool verbose_;
  mutable std::mutex mutex_;
  std::map<std::string, OpCount> counts_;
};

}  // namespace zeal::comm
