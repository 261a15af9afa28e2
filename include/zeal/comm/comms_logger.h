// The `comms_logger` config section: a Communicator that forwards every op to the one it wraps and
// counts, per op, the calls and the bytes of the message each call hands the backend (the input
// tensor's size, as DeepSpeed's comms logger records it). The compressed all-reduce shows up as the
// all_to_all and all_gathers it is made of, so its saving is visible next to a plain all_reduce.
// Thread-safe: ops may be issued from the autograd thread and the caller's thread.
//
// Note [Bytes within and across nodes]: beside the message bytes, each op counts the bytes this
// rank sends to each peer under a direct exchange (all_gather: its input to every peer; reduce_scatter
// and all_to_all: each peer's share of the input; all_reduce: a reduce-scatter plus an all-gather,
// 2 x input / n to every peer; broadcast: the root's tensor to every peer; send: to its peer), split
// by whether the peer is on this rank's node. A node is ranks_per_node consecutive world ranks (the
// launcher's ranks per host; ZEAL_RANKS_PER_NODE overrides it, to treat one host as several). The
// actual algorithm may route differently (a ring passes data through neighbours); the split is
// where the data must go, the quantity ZeRO++ reduces.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "zeal/comm/communicator.h"

namespace zeal::comm {

// Ranks per node for Note [Bytes within and across nodes]: ZEAL_RANKS_PER_NODE, else the launcher's
// LOCAL_SIZE (or Open MPI's), else every rank on one node.
int ranks_per_node();

struct OpCount {
  int64_t calls = 0;
  int64_t bytes = 0;
  int64_t intra_node_bytes = 0;  // Note [Bytes within and across nodes]
  int64_t inter_node_bytes = 0;
};

class CountingCommunicator : public Communicator {
 public:
  // ops: the op names to count ("all_reduce", "all_gather", ...); empty counts every op. verbose
  // logs each op (name, bytes) at info level on the `comm` logger.
  // world_ranks: the group's members' world ranks, in group-rank order (empty: every peer is on this
  // rank's node); ranks_per_node > 0.
  CountingCommunicator(CommunicatorPtr inner, std::set<std::string> ops, bool verbose,
                       std::vector<int> world_ranks = {}, int ranks_per_node = 1);

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
  // per_peer: bytes to each peer (group ranks), or one size for all.
  void count(const char* op, const at::Tensor& message, const std::vector<int64_t>& per_peer);
  void count(const char* op, const at::Tensor& message, int64_t to_each_peer);
  bool same_node(int peer) const;

  CommunicatorPtr inner_;
  std::set<std::string> ops_;
  bool verbose_;
  std::vector<int> world_ranks_;
  int ranks_per_node_;
  mutable std::mutex mutex_;
  std::map<std::string, OpCount> counts_;
};

}  // namespace zeal::comm
