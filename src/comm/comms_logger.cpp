#include "zeal/comm/comms_logger.h"

#include <cstdlib>
#include <string>

#include "zeal/core/logging.h"

namespace zeal::comm {

int ranks_per_node() {
  for (const char* name : {"ZEAL_RANKS_PER_NODE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"}) {
    const char* v = std::getenv(name);
    if (v && *v) {
      const int n = std::atoi(v);
      if (n > 0) return n;
    }
  }
  return 1 << 30;  // unknown: one node
}

CountingCommunicator::CountingCommunicator(CommunicatorPtr inner, std::set<std::string> ops, bool verbose,
                                           std::vector<int> world_ranks, int ranks_per_node)
    : inner_(std::move(inner)),
      ops_(std::move(ops)),
      verbose_(verbose),
      world_ranks_(std::move(world_ranks)),
      ranks_per_node_(ranks_per_node > 0 ? ranks_per_node : 1) {}

bool CountingCommunicator::same_node(int peer) const {
  if (world_ranks_.empty()) return true;
  return world_ranks_[peer] / ranks_per_node_ == world_ranks_[inner_->rank()] / ranks_per_node_;
}

void CountingCommunicator::count(const char* op, const at::Tensor& message, const std::vector<int64_t>& per_peer) {
  if (!ops_.empty() && !ops_.count(op)) return;
  const int64_t bytes = message.defined() ? static_cast<int64_t>(message.nbytes()) : 0;
  int64_t intra = 0, inter = 0;
  for (int peer = 0; peer < size(); ++peer) {
    if (peer == rank() || per_peer.empty()) continue;
    const int64_t b = per_peer.size() == 1 ? per_peer[0] : per_peer[peer];
    (same_node(peer) ? intra : inter) += b;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    OpCount& c = counts_[op];
    ++c.calls;
    c.bytes += bytes;
    c.intra_node_bytes += intra;
    c.inter_node_bytes += inter;
  }
  if (verbose_) log("comm", LogLevel::kInfo, op, " on ", inner_->name(), ": ", bytes, " bytes");
}

void CountingCommunicator::count(const char* op, const at::Tensor& message, int64_t to_each_peer) {
  count(op, message, std::vector<int64_t>{to_each_peer});
}

std::map<std::string, OpCount> CountingCommunicator::counts() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return counts_;
}

void CountingCommunicator::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  counts_.clear();
}

WorkPtr CountingCommunicator::all_reduce(at::Tensor& tensor, const AllReduceOptions& opts) {
  count("all_reduce", tensor, 2 * static_cast<int64_t>(tensor.nbytes()) / size());
  return inner_->all_reduce(tensor, opts);
}

WorkPtr CountingCommunicator::reduce_scatter(at::Tensor& output, const at::Tensor& input,
                                             const ReduceScatterOptions& opts) {
  count("reduce_scatter", input, static_cast<int64_t>(input.nbytes()) / size());
  return inner_->reduce_scatter(output, input, opts);
}

WorkPtr CountingCommunicator::all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& opts) {
  count("all_gather", input, static_cast<int64_t>(input.nbytes()));
  return inner_->all_gather(output, input, opts);
}

WorkPtr CountingCommunicator::broadcast(at::Tensor& tensor, const BroadcastOptions& opts) {
  count("broadcast", tensor, rank() == opts.root ? static_cast<int64_t>(tensor.nbytes()) : 0);
  return inner_->broadcast(tensor, opts);
}

WorkPtr CountingCommunicator::reduce(at::Tensor& tensor, const ReduceOptions& opts) {
  count("reduce", tensor, std::vector<int64_t>{});
  return inner_->reduce(tensor, opts);
}

WorkPtr CountingCommunicator::all_to_all(at::Tensor& output, const at::Tensor& input, const AllToAllOptions& opts) {
  std::vector<int64_t> to;
  if (opts.input_split_sizes.empty()) {
    to.push_back(static_cast<int64_t>(input.nbytes()) / size());
  } else {
    const int64_t row = input.numel() > 0 && input.size(0) > 0 ? static_cast<int64_t>(input.nbytes()) / input.size(0) : 0;
    for (int64_t rows : opts.input_split_sizes) to.push_back(rows * row);
  }
  count("all_to_all", input, to);
  return inner_->all_to_all(output, input, opts);
}

WorkPtr CountingCommunicator::send(const at::Tensor& tensor, int dst, const SendRecvOptions& opts) {
  std::vector<int64_t> to(size(), 0);
  to[dst] = static_cast<int64_t>(tensor.nbytes());
  count("send", tensor, to);
  return inner_->send(tensor, dst, opts);
}

WorkPtr CountingCommunicator::recv(at::Tensor& tensor, int src, const SendRecvOptions& opts) {
  count("recv", tensor, std::vector<int64_t>{});
  return inner_->recv(tensor, src, opts);
}

WorkPtr CountingCommunicator::barrier(const BarrierOptions& opts) {
  count("barrier", at::Tensor(), std::vector<int64_t>{});
  return inner_->barrier(opts);
}

std::shared_ptr<Communicator> CountingCommunicator::split(const std::vector<int>& ranks, const std::string& name) {
  // ranks are world ranks, as every split's
  return std::make_shared<CountingCommunicator>(inner_->split(ranks, name), ops_, verbose_,
                                                world_ranks_.empty() ? std::vector<int>{} : ranks, ranks_per_node_);
}

}  // namespace zeal::comm
