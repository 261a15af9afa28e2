// NCCL backend.
//
// Stream model: each communicator owns one CUDA stream. An op first makes that stream wait for
// the work already queued on the legacy default stream (where the caller's kernels ran), then
// enqueues the NCCL call, then records a completion event. Ops therefore run in submission order,
// after the data they read is ready, and overlap with later work on the default stream.
//
// Threading model: a watchdog thread per communicator polls the completion events. A completed op
// finishes its Work; an op past its deadline aborts the NCCL communicator (ncclCommAbort, the only
// way to free a rank stuck in a collective), fails with a TimeoutError and marks the communicator
// broken (Note [Broken communicators] in mpi_backend.cpp). NCCL does not report which ranks never
// joined; the message says so, and the same run on the mpi backend names them.
//
// Signatures (Note [Collective signatures] in mpi_backend.cpp): each collective also all-gathers
// its signature over the host (MPI) group of the same ranks, asynchronously on the MPI progress
// thread, so the device stream never waits for it. The watchdog completes an op only once both its
// event and that check are done; ranks that disagree abort the NCCL communicator (freeing a rank
// stuck in a mismatched collective) and fail every pending op with the side-by-side message. A
// host check that times out names the ranks that never arrived, which NCCL alone cannot.
#include "zeal/comm/nccl_backend.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <deque>
#include <thread>

#include <ATen/ops/empty.h>

#include "all_to_all_plan.h"
#include "signature.h"
#include "zeal/core/checks.h"
#include "zeal/core/error.h"
#include "zeal/core/logging.h"

namespace zeal::comm {
namespace {

using Clock = std::chrono::steady_clock;

ncclDataType_t nccl_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kByte: return ncclUint8;
    default:
      throw CommError(std::string("backend nccl does not support dtype ") + c10::toString(dtype));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kAvg: return ncclAvg;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

struct Pending {
  WorkPtr work;
  cudaEvent_t done;
  Clock::time_point deadline;
  std::string description;
  std::vector<at::Tensor> keep_alive;
  bool event_done = false;
  WorkPtr check;           // the host all_gather of every rank's signature (none for send/recv)
  at::Tensor signatures;   // its output: one Signature per group rank
  uint64_t seq = 0;
};

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int device, std::string name, Timeout default_timeout, CommunicatorPtr host,
                   std::vector<int> world_ranks)
      : comm_(comm), device_(device), name_(std::move(name)), default_timeout_(default_timeout), host_(std::move(host)),
        world_ranks_(std::move(world_ranks)) {
    CUDA_CHECK(cudaSetDevice(device_));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    NCCL_CHECK(ncclCommCount(comm_, &size_));
    watchdog_ = std::thread([this] { watch(); });
  }

  ~NcclCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    watchdog_.join();
    if (!broken_) ncclCommDestroy(comm_);
    cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const std::string& backend_name() const override {
    static const std::string kName = "nccl";
    return kName;
  }
  Timeout default_timeout() const override { return default_timeout_; }

  WorkPtr all_reduce(at::Tensor& t, const AllReduceOptions& o) override {
    check(t, "all_reduce");
    return enqueue(Signature::of("all_reduce", t, o.site, static_cast<int>(o.op)), {t}, o.timeout, [&](cudaStream_t s) {
      NCCL_CHECK(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_dtype(t.scalar_type()), nccl_op(o.op), comm_, s));
    });
  }

  WorkPtr reduce_scatter(at::Tensor& out, const at::Tensor& in, const ReduceScatterOptions& o) override {
    check(out, "reduce_scatter");
    check(in, "reduce_scatter");
    ZEAL_CHECK_AS(CommError, in.numel() == out.numel() * size_ && in.scalar_type() == out.scalar_type(),
                  "reduce_scatter: input must hold group size x output elements of the output's dtype");
    return enqueue(Signature::of("reduce_scatter", in, o.site, static_cast<int>(o.op)), {out, in}, o.timeout,
                   [&](cudaStream_t s) {
      NCCL_CHECK(ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), nccl_dtype(in.scalar_type()),
                                   nccl_op(o.op), comm_, s));
    });
  }

  WorkPtr all_gather(at::Tensor& out, const at::Tensor& in, const AllGatherOptions& o) override {
    check(out, "all_gather");
    check(in, "all_gather");
    ZEAL_CHECK_AS(CommError, out.numel() == in.numel() * size_ && in.scalar_type() == out.scalar_type(),
                  "all_gather: output must hold group size x input elements of the input's dtype");
    return enqueue(Signature::of("all_gather", in, o.site), {out, in}, o.timeout, [&](cudaStream_t s) {
      NCCL_CHECK(ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), nccl_dtype(in.scalar_type()), comm_, s));
    });
  }

  WorkPtr broadcast(at::Tensor& t, const BroadcastOptions& o) override {
    check(t, "broadcast");
    ZEAL_CHECK_AS(CommError, o.root >= 0 && o.root < size_, "broadcast: root ", o.root, " is outside the group");
    return enqueue(Signature::of("broadcast", t, o.site, -1, o.root), {t}, o.timeout, [&](cudaStream_t s) {
      NCCL_CHECK(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_dtype(t.scalar_type()), o.root, comm_, s));
    });
  }

  WorkPtr reduce(at::Tensor& t, const ReduceOptions& o) override {
    check(t, "reduce");
    ZEAL_CHECK_AS(CommError, o.root >= 0 && o.root < size_, "reduce: root ", o.root, " is outside the group");
    // Non-roots keep their tensor: NCCL writes the result only on the root.
    return enqueue(Signature::of("reduce", t, o.site, static_cast<int>(o.op), o.root), {t}, o.timeout,
                   [&](cudaStream_t s) {
      NCCL_CHECK(ncclReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_dtype(t.scalar_type()), nccl_op(o.op), o.root,
                            comm_, s));
    });
  }

  WorkPtr all_to_all(at::Tensor& out, const at::Tensor& in, const AllToAllOptions& o) override {
    check(out, "all_to_all");
    check(in, "all_to_all");
    ZEAL_CHECK_AS(CommError, in.scalar_type() == out.scalar_type(), "all_to_all: input and output dtypes differ");
    AllToAllPlan plan = plan_all_to_all(out, in, o, size_);
    Signature sig = Signature::of(plan.uneven ? "all_to_all_v" : "all_to_all", in, o.site);
    if (plan.uneven) sig.count = plan.row;
    return enqueue(sig, {out, in}, o.timeout, [&](cudaStream_t s) {
      const size_t elem = in.element_size();
      auto* src = static_cast<char*>(in.data_ptr());
      auto* dst = static_cast<char*>(out.data_ptr());
      NCCL_CHECK(ncclGroupStart());
      for (int peer = 0; peer < size_; ++peer) {
        if (plan.send_counts[peer] > 0)
          NCCL_CHECK(ncclSend(src + plan.send_offsets[peer] * elem, plan.send_counts[peer], nccl_dtype(in.scalar_type()),
                              peer, comm_, s));
        if (plan.recv_counts[peer] > 0)
          NCCL_CHECK(ncclRecv(dst + plan.recv_offsets[peer] * elem, plan.recv_counts[peer], nccl_dtype(in.scalar_type()),
                              peer, comm_, s));
      }
      NCCL_CHECK(ncclGroupEnd());
    });
  }

  WorkPtr send(const at::Tensor& t, int dst, const SendRecvOptions& o) override {
    check(t, "send");
    return enqueue(point_to_point("send"), {t}, o.timeout, [&](cudaStream_t s) {
      NCCL_CHECK(ncclSend(t.data_ptr(), t.numel(), nccl_dtype(t.scalar_type()), dst, comm_, s));
    });
  }

  WorkPtr recv(at::Tensor& t, int src, const SendRecvOptions& o) override {
    check(t, "recv");
    return enqueue(point_to_point("recv"), {t}, o.timeout, [&](cudaStream_t s) {
      NCCL_CHECK(ncclRecv(t.data_ptr(), t.numel(), nccl_dtype(t.scalar_type()), src, comm_, s));
    });
  }

  WorkPtr barrier(const BarrierOptions& o) override {
    at::Tensor flag = at::empty({1}, at::TensorOptions().dtype(at::kInt).device(at::Device(at::kCUDA, device_)));
    return enqueue(Signature::of("barrier", at::Tensor(), o.site), {flag}, o.timeout, [&](cudaStream_t s) {
      NCCL_CHECK(ncclAllReduce(flag.data_ptr(), flag.data_ptr(), 1, ncclInt32, ncclSum, comm_, s));
    });
  }

  std::shared_ptr<Communicator> split(const std::vector<int>& ranks, const std::string& name) override {
    int index = -1;
    for (size_t i = 0; i < ranks.size(); ++i)
      if (ranks[i] == rank_) index = static_cast<int>(i);
    ZEAL_CHECK_AS(CommError, index >= 0, "split: rank ", rank_, " is not in the group it asked for");
    ncclComm_t child;
    NCCL_CHECK(ncclCommSplit(comm_, ranks.front(), index, &child, nullptr));
    std::vector<int> child_world;
    for (int r : ranks) child_world.push_back(world_ranks_[r]);
    CommunicatorPtr child_host = host_ ? host_->split(ranks, name) : nullptr;  // collective, like the NCCL split
    return std::make_shared<NcclCommunicator>(child, device_, name, default_timeout_, child_host, child_world);
  }

 private:
  void check(const at::Tensor& t, const char* op) const {
    ZEAL_CHECK_AS(CommError, t.defined() && t.is_cuda() && t.get_device() == device_, "backend nccl takes tensors on cuda:",
                  device_, "; ", op, " got one on ", t.defined() ? t.device().str() : std::string("nothing"));
    ZEAL_CHECK_AS(CommError, t.is_contiguous(), op, ": tensor must be contiguous");
    nccl_dtype(t.scalar_type());
  }

  // send and recv carry no signature: they pair by peer, not by group order.
  static Signature point_to_point(const char* op) {
    Signature sig;
    std::strncpy(sig.site, op, Signature::kSiteChars - 1);
    return sig;
  }

  template <typename Fn>
  WorkPtr enqueue(Signature sig, std::vector<at::Tensor> tensors, Timeout timeout, Fn&& launch) {
    const bool collective = sig.op >= 0;
    const std::string op = collective ? sig.op_name() : sig.site;
    ZEAL_CHECK_AS(CommError, !broken_, op, " on group ", name_, " cannot run: ", broken_reason_);
    sig.seq = ++seq_;
    std::string description = op + " #" + std::to_string(sig.seq) + " on group " + name_ + " (nccl)";
    if (timeout.count() <= 0) timeout = default_timeout_;
    WorkPtr check;
    at::Tensor signatures;
    if (collective && host_ && size_ > 1) {
      at::Tensor mine = at::empty({static_cast<int64_t>(sizeof(Signature))}, at::kByte);
      std::memcpy(mine.data_ptr(), &sig, sizeof(Signature));
      signatures = at::empty({static_cast<int64_t>(sizeof(Signature)) * size_}, at::kByte);
      check = host_->all_gather(signatures, mine, {timeout, description + " signature"});
    }
    CUDA_CHECK(cudaSetDevice(device_));
    cudaEvent_t ready, done;
    CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventRecord(ready, cudaStreamLegacy));
    CUDA_CHECK(cudaStreamWaitEvent(stream_, ready, 0));
    cudaEventDestroy(ready);
    launch(stream_);
    CUDA_CHECK(cudaEventRecord(done, stream_));
    auto work = std::make_shared<Work>(description);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_.push_back({work, done, Clock::now() + timeout, description, std::move(tensors), false, check,
                          signatures, sig.seq});
    }
    cv_.notify_all();
    return work;
  }

  void watch() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stopping_ || !pending_.empty()) {
      if (pending_.empty()) {
        cv_.wait(lock, [&] { return stopping_ || !pending_.empty(); });
        continue;
      }
      // Any pending op's signature check may have finished (they complete in order on the host).
      for (Pending& p : pending_) {
        if (!p.check || !p.check->is_completed()) continue;
        std::string problem = signature_problem(p);
        p.check.reset();
        if (!problem.empty()) {
          fail_all(problem, /*timeout=*/false);
          break;
        }
      }
      if (pending_.empty()) continue;
      Pending& front = pending_.front();
      if (!front.event_done) {
        cudaError_t state = cudaEventQuery(front.done);
        if (state != cudaSuccess && state != cudaErrorNotReady) {
          Pending p = std::move(front);
          pending_.pop_front();
          lock.unlock();
          cudaEventDestroy(p.done);
          p.work->finish(std::make_exception_ptr(CommError(p.description + " failed: " + cudaGetErrorString(state))));
          lock.lock();
          continue;
        }
        front.event_done = state == cudaSuccess;
      }
      if (front.event_done && !front.check) {  // the op and its signature check are both done
        Pending p = std::move(front);
        pending_.pop_front();
        lock.unlock();
        cudaEventDestroy(p.done);
        p.work->finish(nullptr);
        lock.lock();
        continue;
      }
      if (Clock::now() >= front.deadline || stopping_) {
        fail_all(front.description + " timed out on rank " + std::to_string(rank_) + " of group " + name_ +
                     "; the nccl backend cannot tell which ranks did not arrive (the mpi backend names them)",
                 /*timeout=*/true);
        continue;
      }
      cv_.wait_for(lock, std::chrono::microseconds(200));
    }
  }

  // The host check's verdict: "" when every rank's signature matches this rank's.
  std::string signature_problem(const Pending& p) const {
    try {
      p.check->wait();
    } catch (const std::exception& e) {
      return e.what();  // the host group's own error (a TimeoutError names the missing ranks)
    }
    std::vector<Signature> all(size_);
    std::memcpy(all.data(), p.signatures.data_ptr(), sizeof(Signature) * size_);
    std::vector<const Signature*> known;
    for (const Signature& s : all) known.push_back(&s);
    if (!signatures_differ(known)) return "";
    return describe_mismatch(name_ + " (nccl)", p.seq, rank_, known, world_ranks_);
  }

  // Aborts the NCCL communicator (freeing a rank stuck in a collective) and fails every pending op.
  // Called with mutex_ held.
  void fail_all(const std::string& message, bool timeout) {
    broken_ = true;
    broken_reason_ = (timeout ? "an earlier op timed out: " : "") + message;
    ncclCommAbort(comm_);
    for (auto& p : pending_)
      p.work->finish(timeout ? std::make_exception_ptr(TimeoutError(message)) : std::make_exception_ptr(CommError(message)));
    pending_.clear();
    log("comm", LogLevel::kError, message);
  }

  ncclComm_t comm_;
  int device_;
  std::string name_;
  Timeout default_timeout_;
  CommunicatorPtr host_;          // the same ranks over MPI: signature checks
  std::vector<int> world_ranks_;  // of each group rank
  cudaStream_t stream_ = nullptr;
  int rank_ = 0, size_ = 1;
  uint64_t seq_ = 0;
  std::atomic<bool> broken_{false};
  std::string broken_reason_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Pending> pending_;
  bool stopping_ = false;
  std::thread watchdog_;
};

}  // namespace

CommunicatorPtr nccl_world(const CommunicatorPtr& host_world, int device, Timeout default_timeout) {
  ZEAL_CHECK_AS(CommError, host_world, "nccl_world needs a host communicator to share the NCCL id");
  int count = 0;
  CUDA_CHECK(cudaGetDeviceCount(&count));
  ZEAL_CHECK_AS(CommError, device >= 0 && device < count, "nccl_world: device ", device, " does not exist (",
                count, " CUDA devices)");
  ncclUniqueId id;
  at::Tensor id_bytes = at::empty({static_cast<int64_t>(sizeof(id))}, at::kByte);
  if (host_world->rank() == 0) {
    NCCL_CHECK(ncclGetUniqueId(&id));
    std::memcpy(id_bytes.data_ptr(), &id, sizeof(id));
  }
  host_world->broadcast(id_bytes, {0})->wait();
  std::memcpy(&id, id_bytes.data_ptr(), sizeof(id));
  CUDA_CHECK(cudaSetDevice(device));
  ncclComm_t comm;
  NCCL_CHECK(ncclCommInitRank(&comm, host_world->size(), id, host_world->rank()));
  std::vector<int> world_ranks(host_world->size());
  for (int r = 0; r < host_world->size(); ++r) world_ranks[r] = r;
  return std::make_shared<NcclCommunicator>(comm, device, "world", default_timeout, host_world, world_ranks);
}

}  // namespace zeal::comm
