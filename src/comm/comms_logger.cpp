#include "zeal/comm/comms_logger.h"

#include "zeal/core/logging.h"

namespace zeal::comm {

CountingCommunicator::CountingCommunicator(CommunicatorPtr inner, std::set<std::string> ops, bool verbose)
    : inner_(std::move(inner)), ops_(std::move(ops)), verbose_(verbose) {}

void CountingCommunicator::count(const char* op, const at::Tensor& message) {
  if (!ops_.empty() && !ops_.count(op)) return;
  const int64_t bytes = message.defined() ? static_cast<int64_t>(message.nbytes()) : 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    OpCount& c = counts_[op];
    ++c.calls;
    c.bytes += bytes;
  }
  if (verbose_) log("comm", LogLevel::kInfo, op, " on ", inner_->name(), ": ", bytes, " bytes");
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
  count("all_reduce", tensor);
  return inner_->all_reduce(tensor, opts);
}

WorkPtr CountingCommunicator::reduce_scatter(at::Tensor& output, const at::Tensor& input,
                                             const ReduceScatterOptions& opts) {
  count("reduce_scatter", input);
  return inner_->reduce_scatter(output, input, opts);
}

WorkPtr CountingCommunicator::all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& opts) {
  count("all_gather", input);
  return inner_->all_gather(output, input, opts);
}

WorkPtr CountingCommunicator::broadcast(at::Tensor& tensor, const BroadcastOptions& opts) {
  count("broadcast", tensor);
  return inner_->broadcast(tensor, opts);
}

WorkPtr CountingCommunicator::reduce(at::Tensor& tensor, const ReduceOptions& opts) {
  count("reduce", tensor);
  return inner_->reduce(tensor, opts);
}

WorkPtr CountingCommunicator::all_to_all(at::Tensor& output, const at::Tensor& input, const AllToAllOptions& opts) {
  count("all_to_all", input);
  return inner_->all_to_all(output, input, opts);
}

WorkPtr CountingCommunicator::send(const at::Tensor& tensor, int dst, const SendRecvOptions& opts) {
  count("send", tensor);
  return inner_->send(tensor, dst, opts);
}

WorkPtr CountingCommunicator::recv(at::Tensor& tensor, int src, const SendRecvOptions& opts) {
  count("recv", tensor);
  return inner_->recv(tensor, src, opts);
}

WorkPtr CountingCommunicator::barrier(const BarrierOptions& opts) {
  count("barrier", at::Tensor());
  return inner_->barrier(opts);
}

std::shared_ptr<Communicator> CountingCommunicator::split(const std::vector<int>& ranks, const std::string& name) {
  return std::make_shared<CountingCommunicator>(inner_->split(ranks, name), ops_, verbose_);
}

}  // namespace zeal::comm
