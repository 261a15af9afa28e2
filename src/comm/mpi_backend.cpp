// MPI backend.
//
// Threading model (read this before changing anything here):
//  1. One progress thread per process makes the MPI calls of every op. Callers on any thread
//     enqueue an op and get a Work back; the progress thread runs ops in FIFO order. FIFO order is
//     what keeps collectives on one communicator in the same order on every rank, as MPI requires.
//  2. Collectives run as blocking MPI calls (MPI_Allreduce, ...): Open MPI's blocking algorithms are
//     2-3x faster than its non-blocking ones on large messages (benchmarks/allreduce.py). Point-to-
//     point ops are started non-blocking and polled between ops, so a recv queued before the
//     matching send on the same process cannot deadlock.
//  3. A watchdog thread owns the deadlines. When the op in progress (or one queued behind it, or a
//     point-to-point op in flight) passes its deadline, the watchdog fails its Work with a
//     TimeoutError. The progress thread may stay blocked inside MPI; the Work is settled once,
//     by whichever thread gets there first (Op::settle).
//  4. Arrival announcements. Before a collective on a group starts, the rank sends the op's sequence
//     number to every peer on a private duplicate of the group's communicator. On a timeout the
//     watchdog drains those messages: the peers whose last announced number is below the op's are
//     the ranks that did not arrive, and the TimeoutError names them.
//     Note [Collective signatures]: the announcement is the op's whole signature (sequence
//     number, op, reduce op, dtype, element count, root, call site), not only its number. After
//     a collective returns, the rank waits (within the op's deadline) for every peer's signature
//     of the same number and compares; while it is blocked inside MPI, the watchdog compares
//     whatever signatures have arrived. Ranks that disagree (one skipped a collective, issued
//     another op or another size) fail the op at once on every rank with a CommError that shows
//     each rank's signature side by side, and the communicator is marked broken. The cost is
//     the announcements already sent plus a short poll for peers' ones, which arrive with the
//     collective's own traffic (benchmarks/allreduce.py measures it).
//  5. Note [Broken communicators]: an MPI op that timed out cannot be cancelled, so its
//     communicator is marked broken; ops queued or started on it afterwards fail at once with
//     CommError, and shutdown skips MPI_Finalize (which could wait on the lost op forever).
//  6. fp16 and bf16 travel as 16-bit words with user-defined MPI reductions that widen to fp32
//     (kernels/cpu/half_reduce.h), so sums are rounded once per step, not truncated.
//  7. Note [Caller-run collectives]: handing an op to the progress thread and its Work back costs
//     two thread wake-ups, 20-40 us on a busy core, which is most of a small collective's time
//     (raw MPI: under 10 us up to 64 KiB). So a small collective (at most kCallerRunBytes) that
//     finds the runtime idle - nothing queued, no op in progress - runs on the calling thread:
//     it becomes the op in progress (so FIFO order holds and the watchdog watches it as any
//     other), announces itself, and then waits, polling, until every peer has announced the same
//     signature, before it enters the blocking MPI call. The wait keeps every guarantee: a peer
//     that never arrives fails it with the TimeoutError naming the missing ranks (the watchdog
//     settles it; the caller, polling, sees that and returns), and a peer at another op fails it
//     with the mismatch before anything enters MPI. Once every peer has entered, the blocking call
//     can only stall if a peer dies inside it; then the watchdog, which cannot return the error
//     to a caller blocked in MPI, logs it and ends the process (exit code 75), as a dead rank
//     does. Only ops whose completion needs every rank to have entered run this way (all_reduce,
//     reduce_scatter, all_gather, all_to_all, barrier), so the wait adds no ordering the op did
//     not already have; a broadcast or a reduce can complete early on some ranks and stays on the
//     progress thread, as do point-to-point ops and every larger op, which the caller may want to
//     overlap with compute. An all_to_all(v) that a rank holds small (kCallerRunBytes each way)
//     goes further: that rank sends its data as point-to-point messages right after announcing,
//     without waiting for the peers (run_exchange; one message round less), tagged with the op's
//     number so they pair only with the same op, and returns only when every message arrived with
//     the count it expects and every peer announced the same signature. The announcement says so
//     (Signature::kEagerExchange); a rank holding the op large waits for the announcements and
//     exchanges messages too if any peer went ahead, else enters MPI_Alltoallv (faster for large
//     chunks), so the ranks always agree on how the op travels, on either thread.
#include "zeal/comm/mpi_backend.h"

// The C API only: Open MPI's deprecated C++ bindings would need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <atomic>
#include <climits>
#include <algorithm>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <thread>

#include "all_to_all_plan.h"
#include "cpu/half_reduce.h"
#include "rendezvous.h"
#include "signature.h"
#include "zeal/core/checks.h"
#include "zeal/core/error.h"
#include "zeal/core/logging.h"

namespace zeal::comm {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kArrivalTag = 7001;
// Note [Caller-run collectives]: the largest op (bytes of its larger buffer) the caller runs itself.
constexpr size_t kCallerRunBytes = size_t{1} << 20;
// Note [Caller-run collectives]: the tags of a caller-run all_to_all(v)'s messages on a group's
// announcement communicator: the op's sequence number modulo kExchangeTags, from kExchangeTagBase
// (MPI guarantees tags up to 32767; kArrivalTag lies below the range).
constexpr int kExchangeTagBase = 8192;
constexpr int kExchangeTags = 16384;
constexpr int kCallerStuckExitCode = 75;  // EX_TEMPFAIL: a peer died inside a caller-run op

// State shared by a communicator and its ops.
// A peer's signatures of its last kSlots ops on a group, by sequence number (a ring: each op's
// announcement costs a copy, not a tree insertion and erasure).
class RecentSignatures {
 public:
  static constexpr size_t kSlots = 512;
  void put(const Signature& s) {
    if (slots_.empty()) slots_.resize(kSlots);
    slots_[s.seq % kSlots] = s;
    newest_ = std::max(newest_, s.seq);
  }
  const Signature* find(uint64_t seq) const {
    if (slots_.empty() || seq == 0) return nullptr;
    const Signature& s = slots_[seq % kSlots];
    return s.seq == seq ? &s : nullptr;
  }
  const Signature* newest() const { return find(newest_); }

 private:
  std::vector<Signature> slots_;
  uint64_t newest_ = 0;
};

// A caller-run all_to_all(v) as point-to-point messages (Note [Caller-run collectives]): its
// buffers and, in elements, each peer's chunk.
struct Exchange {
  at::Tensor send, recv;  // held while a message may still read or write them
  std::vector<int> send_counts, send_offsets, recv_counts, recv_offsets;
  MPI_Datatype dtype = MPI_BYTE;
};

struct GroupState {
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Comm arrival_comm = MPI_COMM_NULL;
  std::string name;
  int rank = 0;
  int size = 1;
  std::vector<int> world_ranks;  // world rank of each group rank
  std::atomic<bool> broken{false};
  std::mutex broken_mutex;
  std::string broken_reason;
  std::mutex arrival_mutex;            // guards the probe-and-receive of announcements
  std::vector<uint64_t> last_arrived;  // highest sequence number announced by each group rank
  std::vector<RecentSignatures> announced;  // each group rank's recent signatures
  std::map<uint64_t, Signature> unverified;  // own signatures of completed ops not every peer confirmed yet
  // One receive per peer posted ahead for its next announcement (drain_arrivals).
  std::vector<MPI_Request> arrival_requests;
  std::vector<Signature> arrival_buffers;
  uint64_t next_seq = 0;               // assigned under the runtime's queue lock
  // Exchanges abandoned with messages still open (the group is broken): their buffers are never
  // freed, so a message that completes late cannot touch reused memory. Guarded by broken_mutex.
  std::vector<std::shared_ptr<Exchange>> abandoned;

  std::string broken_message() {
    std::lock_guard<std::mutex> lock(broken_mutex);
    return broken_reason;
  }
};

struct Op {
  std::string fixed_description;  // an op that is no collective ("mpi setup call")
  int64_t numel = -1;             // of the op's tensor, for description(); -1: none
  at::ScalarType dtype = at::kFloat;
  std::string op_name;
  std::shared_ptr<GroupState> group;
  uint64_t seq = 0;
  Signature signature;  // seq filled at submit
  bool point_to_point = false;  // started non-blocking and polled; names its peer on timeout
  int peer = -1;
  std::function<void()> run;                        // collectives and setup calls: blocking
  std::function<void(MPI_Request*)> start;           // point-to-point: non-blocking
  std::function<void()> on_success;
  std::shared_ptr<Exchange> exchange;  // all_to_all(v): how the caller runs it (run_exchange)
  WorkPtr work;
  Clock::time_point deadline;
  Clock::time_point started;  // when the progress thread (or its caller) took it
  bool caller_may_run = false;  // Note [Caller-run collectives]: small, and its kind allows it
  bool caller_run = false;      // runs on the calling thread
  std::atomic<bool> in_mpi{false};  // a caller-run op is inside its blocking MPI call
  MPI_Request request = MPI_REQUEST_NULL;
  std::atomic<bool> settled{false};

  // "all_reduce #12 on group world (grad bucket 0, 8 x Float)": built when a message needs it.
  std::string description() const {
    if (!fixed_description.empty()) return fixed_description;
    std::string out = op_name + " #" + std::to_string(seq) + " on group " + (group ? group->name : std::string("?"));
    if (numel >= 0) {
      const std::string site(signature.site, strnlen(signature.site, Signature::kSiteChars));
      out += " (" + (site.empty() ? std::string() : site + ", ") + std::to_string(numel) + " x " +
             c10::toString(dtype) + ")";
    }
    return out;
  }

  // Completes the Work once; later calls (the other thread) do nothing.
  bool settle(std::exception_ptr error) {
    bool expected = false;
    if (!settled.compare_exchange_strong(expected, true)) return false;
    work->finish(error);
    return true;
  }
};

struct PendingSend {
  MPI_Request request;
  std::shared_ptr<Signature> value;
};

// Note [Injected collective faults]: a test hook (c10d's fault-injection tests do the same through
// virtual hooks): the next matching collective this process issues is silently dropped, exactly
// what a rank whose code skipped one call does. Used only by the fault tests.
struct InjectedFault {
  std::mutex mutex;
  std::string group_prefix;
  int64_t countdown = -1;  // collectives on matching groups to let through before the dropped one
};
InjectedFault& injected_fault() {
  static InjectedFault fault;
  return fault;
}

// Note [Collective signatures]: on unless a benchmark turns the comparison off to measure its cost.
std::atomic<bool>& signatures_checked() {
  static std::atomic<bool> on{true};
  return on;
}

// Note [Caller-run collectives]: on unless a benchmark turns it off to measure the hand-off.
std::atomic<bool>& caller_runs_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

// Whether this op is the one to drop (counts it down otherwise).
bool drop_injected(const GroupState& g) {
  InjectedFault& f = injected_fault();
  std::lock_guard<std::mutex> lock(f.mutex);
  if (f.countdown < 0 || g.size <= 1 || g.name.rfind(f.group_prefix, 0) != 0) return false;
  if (f.countdown-- > 0) return false;
  return true;
}

class MpiRuntime {
 public:
  static MpiRuntime& instance() {
    static MpiRuntime runtime;
    return runtime;
  }

  void submit(std::shared_ptr<Op> op) {
    std::unique_lock<std::mutex> lock(mutex_);
    ZEAL_CHECK_AS(CommError, running_, "collectives were shut down; ", op->op_name, " cannot run");
    if (!op->point_to_point && drop_injected(*op->group)) {
      lock.unlock();
      log("comm", LogLevel::kWarn, "fault injection: dropping ", op->op_name, " on group ", op->group->name);
      release_tensors(*op);
      op->settle(nullptr);
      return;
    }
    op->seq = ++op->group->next_seq;
    op->signature.seq = op->seq;
    if (op->caller_may_run && queue_.empty() && !current_ && caller_runs_enabled().load(std::memory_order_relaxed)) {
      // Note [Caller-run collectives]
      op->caller_run = true;
      op->started = Clock::now();
      current_ = op;
      lock.unlock();
      execute(op);
      lock.lock();
      current_.reset();
      if (!queue_.empty()) cv_.notify_all();  // ops other threads queued meanwhile
      return;
    }
    queue_.push_back(std::move(op));
    cv_.notify_all();
  }

  // Runs fn on the progress thread and waits for it (setup calls such as MPI_Comm_dup).
  void run_sync(std::function<void()> fn) {
    auto op = std::make_shared<Op>();
    op->op_name = "setup";
    op->fixed_description = "mpi setup call";
    op->work = std::make_shared<Work>("mpi setup call");
    op->run = std::move(fn);
    op->deadline = Clock::time_point::max();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ZEAL_CHECK_AS(CommError, running_, "collectives were shut down");
      queue_.push_back(op);
      cv_.notify_all();
    }
    op->work->wait();
  }

  void shutdown() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!running_) return;
      running_ = false;
      cv_.notify_all();
    }
    if (watchdog_.joinable()) watchdog_.join();
    // A progress thread stuck in an op that timed out never returns: leave it behind.
    if (any_broken_) {
      progress_.detach();
    } else if (progress_.joinable()) {
      progress_.join();
    }
  }

  void set_world_rank(int rank) { world_rank_ = rank; }

  size_t sends_pending() {
    std::lock_guard<std::mutex> lock(sends_mutex_);
    return sends_.size();
  }

  MPI_Op reduce_op(at::ScalarType dtype, ReduceOp op) const {
    bool half = dtype == at::kHalf, bf16 = dtype == at::kBFloat16;
    int which = op == ReduceOp::kMax ? 1 : op == ReduceOp::kMin ? 2 : 0;
    if (half || bf16) return half_ops_[bf16 ? 1 : 0][which];
    return which == 1 ? MPI_MAX : which == 2 ? MPI_MIN : MPI_SUM;
  }

 private:
  MpiRuntime() {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      // The progress thread shares cores with the compute threads it overlaps (gradient buckets
      // are reduced during backward): a rank waiting inside a collective must yield the core
      // rather than spin on it. A user's own setting wins.
      setenv("OMPI_MCA_mpi_yield_when_idle", "1", /*overwrite=*/0);
      int provided = 0;
      MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided));
      ZEAL_CHECK_AS(CommError, provided == MPI_THREAD_MULTIPLE, "this MPI library provides thread level ", provided,
                    "; Zeal needs MPI_THREAD_MULTIPLE (its watchdog probes while a collective runs)");
      owns_mpi_ = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    create_half_ops();
    running_ = true;
    progress_ = std::thread([this] { progress_loop(); });
    watchdog_ = std::thread([this] { watchdog_loop(); });
  }

  ~MpiRuntime() { shutdown(); }

  template <kernels::HalfKind Kind, kernels::HalfReduce Reduce>
  static void half_op(void* in, void* inout, int* len, MPI_Datatype*) {
    kernels::half_reduce(Kind, Reduce, static_cast<const uint16_t*>(in), static_cast<uint16_t*>(inout),
                         static_cast<size_t>(*len));
  }

  void create_half_ops() {
    using K = kernels::HalfKind;
    using R = kernels::HalfReduce;
    MPI_Op_create(&half_op<K::kFp16, R::kSum>, 1, &half_ops_[0][0]);
    MPI_Op_create(&half_op<K::kFp16, R::kMax>, 1, &half_ops_[0][1]);
    MPI_Op_create(&half_op<K::kFp16, R::kMin>, 1, &half_ops_[0][2]);
    MPI_Op_create(&half_op<K::kBf16, R::kSum>, 1, &half_ops_[1][0]);
    MPI_Op_create(&half_op<K::kBf16, R::kMax>, 1, &half_ops_[1][1]);
    MPI_Op_create(&half_op<K::kBf16, R::kMin>, 1, &half_ops_[1][2]);
  }

  // Sends op's signature to every peer; the sends go to `sends`, whose owner completes them.
  void announce(const std::shared_ptr<Op>& op_ptr, std::vector<PendingSend>& sends) {
    const Op& op = *op_ptr;
    GroupState& g = *op.group;
    // The op's own signature is the buffer: the pointer shares the op's ownership (no copy made).
    std::shared_ptr<Signature> value(op_ptr, &op_ptr->signature);
    for (int peer = 0; peer < g.size; ++peer) {
      if (peer == g.rank) continue;
      PendingSend send{MPI_REQUEST_NULL, value};
      MPI_CHECK(MPI_Isend(value.get(), sizeof(Signature), MPI_BYTE, peer, kArrivalTag, g.arrival_comm, &send.request));
      sends.push_back(std::move(send));
    }
  }

  // Hands announcements still in flight to the progress thread, which polls them (poll_background).
  void hand_over_sends(std::vector<PendingSend>& sends) {
    for (size_t i = 0; i < sends.size();) {
      int flag = 0;
      MPI_Test(&sends[i].request, &flag, MPI_STATUS_IGNORE);
      if (flag) {
        sends[i] = std::move(sends.back());
        sends.pop_back();
      } else {
        ++i;
      }
    }
    if (sends.empty()) return;
    {
      std::lock_guard<std::mutex> lock(sends_mutex_);
      for (auto& send : sends) sends_.push_back(std::move(send));
    }
    sends.clear();
    { std::lock_guard<std::mutex> lock(mutex_); }  // the progress thread is waiting or sees sends_
    cv_.notify_all();
  }

  // One look at the peers' announcements of op.seq: true when every peer announced it (with the
  // same signature, when signatures are checked); a different signature throws the mismatch.
  bool peers_arrived(Op& op) {
    GroupState& g = *op.group;
    if (signatures_checked().load(std::memory_order_relaxed)) {
      bool all = true;
      std::string mismatch = compare_signatures(op, &all, /*one_each=*/true);
      if (!mismatch.empty()) throw CommError(mismatch);
      return all;
    }
    drain_arrivals(g, /*one_each=*/true);
    std::lock_guard<std::mutex> lock(g.arrival_mutex);
    for (int peer = 0; peer < g.size; ++peer)
      if (peer != g.rank && g.last_arrived[peer] < op.seq) return false;
    return true;
  }

  // Spin while the peers are likely just behind, then give the core away to the compute threads
  // this rank shares it with (as MPI does with mpi_yield_when_idle, set below).
  static void back_off(int spins) {
    if (spins > 20000) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    } else if (spins > 200) {
      std::this_thread::yield();
    }
  }

  // Note [Caller-run collectives]: polls until every peer announced op.seq (and, with signature
  // checks on, announced the same signature). False if the watchdog settled the op meanwhile
  // (a peer missed the deadline). A mismatch throws CommError.
  bool await_peers(Op& op) {
    for (int spins = 0;; ++spins) {
      if (peers_arrived(op)) return true;
      if (op.settled.load()) return false;
      back_off(spins);
    }
  }

  // Note [Caller-run collectives]: an all_to_all(v) on the calling thread as point-to-point
  // messages, posted right after the announcement rather than after every peer's (raw
  // MPI_Alltoallv is itself pairwise messages at these sizes, so this saves the announcement's
  // message round). The messages go on the announcement communicator with the op's sequence
  // number in their tag, so they can only pair with the same op on the peer. The op returns when
  // every message completed with the element counts this rank expects and every peer announced the
  // same signature; a mismatch, a count that differs or a peer past the deadline abandons the open
  // messages (their buffers kept for good) and breaks the group. False: the watchdog settled it.
  bool run_exchange(Op& op) {
    GroupState& g = *op.group;
    Exchange& x = *op.exchange;
    const int tag = kExchangeTagBase + static_cast<int>(op.seq % kExchangeTags);
    const size_t elem = x.send.element_size();
    char* send = static_cast<char*>(x.send.data_ptr());
    char* recv = static_cast<char*>(x.recv.data_ptr());
    // Reused by every exchange on this thread (an op's allocations are most of a small one's cost).
    thread_local std::vector<MPI_Request> requests;
    thread_local std::vector<int> from;  // the peer of each receive: requests [0, from.size())
    thread_local std::vector<MPI_Status> statuses;
    requests.clear();
    from.clear();
    for (int peer = 0; peer < g.size; ++peer) {
      if (peer == g.rank) continue;
      requests.push_back(MPI_REQUEST_NULL);
      from.push_back(peer);
      MPI_CHECK(MPI_Irecv(recv + x.recv_offsets[peer] * elem, x.recv_counts[peer], x.dtype, peer, tag,
                          g.arrival_comm, &requests.back()));
    }
    for (int peer = 0; peer < g.size; ++peer) {
      if (peer == g.rank) continue;
      requests.push_back(MPI_REQUEST_NULL);
      MPI_CHECK(MPI_Isend(send + x.send_offsets[peer] * elem, x.send_counts[peer], x.dtype, peer, tag,
                          g.arrival_comm, &requests.back()));
    }
    // A count that differs breaks the group, but the peers are in this op: their messages still
    // end, and a group left with none open does not stop MPI_Finalize.
    auto fail = [&](const std::string& message) {
      const bool ended = end_open(op, requests);
      if (!ended) abandon(op, requests);
      mark_broken(g, message, /*mpi_in_flight=*/!ended);
      return CommError(message);
    };
    if (x.send_counts[g.rank] != x.recv_counts[g.rank])
      throw fail(op.description() + ": rank " + std::to_string(g.rank) + " sends itself " +
                 std::to_string(x.send_counts[g.rank]) + " elements but expects " +
                 std::to_string(x.recv_counts[g.rank]) + " (input_split_sizes and output_split_sizes disagree)");
    std::memcpy(recv + x.recv_offsets[g.rank] * elem, send + x.send_offsets[g.rank] * elem,
                static_cast<size_t>(x.send_counts[g.rank]) * elem);
    statuses.resize(requests.size());
    bool data = false, peers = false;
    for (int spins = 0;; ++spins) {
      if (!data) {
        int flag = 0;
        if (MPI_Testall(static_cast<int>(requests.size()), requests.data(), &flag, statuses.data()) != MPI_SUCCESS) {
          std::string why = "a message failed";
          for (size_t i = 0; i < from.size(); ++i)
            if (statuses[i].MPI_ERROR == MPI_ERR_TRUNCATE)
              why = "rank " + std::to_string(from[i]) + " sent more than the " + std::to_string(x.recv_counts[from[i]]) +
                    " elements this rank expects from it";
          throw fail(op.description() + ": " + why + " (the ranks' split sizes disagree)");
        }
        data = flag != 0;
        for (size_t i = 0; data && i < from.size(); ++i) {
          int got = 0;
          MPI_Get_count(&statuses[i], x.dtype, &got);
          if (got != x.recv_counts[from[i]])
            throw fail(op.description() + ": rank " + std::to_string(from[i]) + " sent " + std::to_string(got) +
                       " elements, this rank expects " + std::to_string(x.recv_counts[from[i]]) +
                       " (the ranks' split sizes disagree)");
        }
      }
      // The peers' announcements were sent before their data: look at them with the data in, or
      // now and then while it is not (a peer at another op sends none).
      if (!peers && (data || spins % 16 == 15)) {
        try {
          peers = peers_arrived(op);
        } catch (...) {
          abandon(op, requests);
          throw;
        }
      }
      if (data && peers) return true;
      if (op.settled.load()) {
        abandon(op, requests);
        return false;
      }
      back_off(spins);
    }
  }

  // Waits, within the op's deadline, for an exchange's messages still open; whether they all ended.
  bool end_open(Op& op, std::vector<MPI_Request>& requests) {
    for (int spins = 0; Clock::now() < op.deadline && !op.settled.load(); ++spins) {
      int flag = 0;
      MPI_Testall(static_cast<int>(requests.size()), requests.data(), &flag, MPI_STATUSES_IGNORE);
      if (flag) return true;
      back_off(spins);
    }
    return false;
  }

  // Whether a peer announced op.seq as an eager exchange (every peer announced it: await_peers).
  bool any_peer_eager(Op& op) {
    GroupState& g = *op.group;
    std::lock_guard<std::mutex> lock(g.arrival_mutex);
    for (int peer = 0; peer < g.size; ++peer) {
      if (peer == g.rank) continue;
      const Signature* s = g.announced[peer].find(op.seq);
      if (s && (s->flags & Signature::kEagerExchange)) return true;
    }
    return false;
  }

  // Leaves an exchange's open messages behind for good (its group is or will be marked broken).
  void abandon(Op& op, std::vector<MPI_Request>& requests) {
    for (MPI_Request& r : requests) {
      if (r == MPI_REQUEST_NULL) continue;
      MPI_Cancel(&r);
      MPI_Request_free(&r);
    }
    GroupState& g = *op.group;
    std::lock_guard<std::mutex> lock(g.broken_mutex);
    g.abandoned.push_back(op.exchange);
  }

  // Compares the peers' signatures for op.seq with the op's own. Returns the mismatch message,
  // or "" when every peer that announced op.seq agrees; *all_arrived says whether every one did.
  std::string compare_signatures(Op& op, bool* all_arrived, bool one_each = false) {
    GroupState& g = *op.group;
    drain_arrivals(g, one_each);
    std::lock_guard<std::mutex> lock(g.arrival_mutex);
    bool disagree = false, complete = true;
    for (int peer = 0; peer < g.size; ++peer) {
      if (peer == g.rank) continue;
      const Signature* s = g.announced[peer].find(op.seq);
      if (!s) {
        complete = false;
      } else if (!s->same_as(op.signature)) {
        disagree = true;
      }
    }
    if (all_arrived) *all_arrived = complete;
    if (!disagree) return "";
    return mismatch_message(g, op.signature);
  }

  // The mismatch message for op `own.seq`: this rank's signature beside every peer's that arrived.
  // Called with g.arrival_mutex held.
  static std::string mismatch_message(const GroupState& g, const Signature& own) {
    std::vector<const Signature*> known(g.size, nullptr);
    for (int peer = 0; peer < g.size; ++peer) {
      if (peer == g.rank) {
        known[peer] = &own;
      } else if (const Signature* s = g.announced[peer].find(own.seq)) {
        known[peer] = s;
      }
    }
    return describe_mismatch(g.name, own.seq, g.rank, known, g.world_ranks);
  }

  // After a collective returned: every peer's signature for it must arrive and agree. An op whose
  // completion means every rank entered it (all_reduce, reduce_scatter, all_gather, all_to_all,
  // barrier, reduce at its root) waits for them: they were sent before each peer entered. A
  // broadcast, or a reduce off its root, can complete before another peer arrives, and that peer
  // may first need this rank in a later op: waiting there could deadlock, so what has not arrived
  // is checked as it arrives (drain_arrivals), and a late mismatch breaks the group.
  void verify_signatures(Op& op) {
    const bool everyone_entered = op.op_name != "broadcast" && (op.op_name != "reduce" || op.signature.root == op.group->rank);
    if (!everyone_entered) {
      bool all = false;
      std::string mismatch = compare_signatures(op, &all);
      if (!mismatch.empty()) throw CommError(mismatch);
      if (!all) {
        std::lock_guard<std::mutex> lock(op.group->arrival_mutex);
        auto& pending = op.group->unverified;
        pending[op.seq] = op.signature;
        while (pending.size() > 1024) pending.erase(pending.begin());
      }
      return;
    }
    for (int spins = 0;; ++spins) {
      bool all = false;
      std::string mismatch = compare_signatures(op, &all);
      if (!mismatch.empty()) throw CommError(mismatch);
      if (all || op.settled.load()) return;  // settled: the watchdog timed it out meanwhile
      if (spins > 64) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  void fail_mismatch(Op& op, const std::string& message) {
    if (op.settled.load()) return;
    mark_broken(*op.group, message);
    if (op.settle(std::make_exception_ptr(CommError(message)))) log("comm", LogLevel::kError, message);
  }

  // Reads the arrival announcements this group received (any thread). Each peer has one receive
  // posted ahead. Testing a completed receive makes no MPI progress call, and a progress call that
  // finds nothing costs a sched_yield (mpi_yield_when_idle, set below), about 1 us: so `one_each`
  // takes at most one announcement per peer and does not test the receive it posts again (the
  // caller-run wait polls again anyway); otherwise every announcement waiting is read.
  void drain_arrivals(GroupState& g, bool one_each = false) {
    if (g.size <= 1) return;
    std::lock_guard<std::mutex> lock(g.arrival_mutex);
    for (int peer = 0; peer < g.size; ++peer) {
      if (peer == g.rank) continue;
      while (true) {
        int flag = 0;
        MPI_Test(&g.arrival_requests[peer], &flag, MPI_STATUS_IGNORE);
        if (!flag) break;
        record_arrival(g, peer, g.arrival_buffers[peer]);
        post_arrival_receive(g, peer);
        if (one_each) break;
      }
    }
  }

  // Posts the receive for peer's next announcement (at group creation and after each one read).
  static void post_arrival_receive(GroupState& g, int peer) {
    MPI_CHECK(MPI_Irecv(&g.arrival_buffers[peer], sizeof(Signature), MPI_BYTE, peer, kArrivalTag, g.arrival_comm,
                        &g.arrival_requests[peer]));
  }

 public:
  // Keeps a new group alive to the end (its receives stay posted) and posts its receives.
  void register_group(const std::shared_ptr<GroupState>& g) {
    g->last_arrived.assign(g->size, 0);
    g->announced.assign(g->size, {});
    g->arrival_requests.assign(g->size, MPI_REQUEST_NULL);
    g->arrival_buffers.assign(g->size, Signature{});
    run_sync([&] {
      for (int peer = 0; peer < g->size; ++peer)
        if (peer != g->rank) post_arrival_receive(*g, peer);
    });
    std::lock_guard<std::mutex> lock(mutex_);
    groups_.push_back(g);
  }

 private:
  // Called with g.arrival_mutex held.
  void record_arrival(GroupState& g, int peer, const Signature& value) {
    g.last_arrived[peer] = std::max(g.last_arrived[peer], value.seq);
    g.announced[peer].put(value);  // a peer far ahead: the newest kSlots kept
    // A late signature of an op this rank completed without waiting for it (see verify_signatures).
    auto own = g.unverified.find(value.seq);
    if (own != g.unverified.end() && !own->second.same_as(value)) {
      std::string message = mismatch_message(g, own->second);
      g.unverified.erase(own);
      mark_broken(g, message);
      log("comm", LogLevel::kError, message);
    }
  }

  std::string missing_ranks(Op& op) {
    GroupState& g = *op.group;
    std::string group_ranks, world_ranks;
    if (!op.point_to_point) {
      drain_arrivals(g);
      std::lock_guard<std::mutex> lock(g.arrival_mutex);
      std::string last_seen;
      for (int peer = 0; peer < g.size; ++peer) {
        if (peer == g.rank || g.last_arrived[peer] >= op.seq) continue;
        group_ranks += (group_ranks.empty() ? "" : ", ") + std::to_string(peer);
        world_ranks += (world_ranks.empty() ? "" : ", ") + std::to_string(g.world_ranks[peer]);
        // Where it was last seen on this group, beside this rank's own signature.
        const Signature* newest = g.announced[peer].newest();
        last_seen += "; rank " + std::to_string(peer) + " was last at " +
                     (newest ? newest->describe() : std::string("no op of this group"));
      }
      if (group_ranks.empty())
        return "every rank of the group arrived but the op did not complete (mismatched collectives, or a rank failed inside the op)";
      return "ranks that did not arrive: [" + group_ranks + "] (world ranks [" + world_ranks + "]); this rank is at " +
             op.signature.describe() + last_seen;
    } else {
      group_ranks = std::to_string(op.peer);
      world_ranks = std::to_string(g.world_ranks[op.peer]);
    }
    return "ranks that did not arrive: [" + group_ranks + "] (world ranks [" + world_ranks + "])";
  }

  // mpi_in_flight: an MPI operation of the group may never end (a timed-out or mismatched op), so
  // shutdown must skip MPI_Finalize (Note [Broken communicators]).
  void mark_broken(GroupState& g, const std::string& reason, bool mpi_in_flight = true) {
    std::lock_guard<std::mutex> lock(g.broken_mutex);
    if (!g.broken.exchange(true)) g.broken_reason = reason;
    if (mpi_in_flight) any_broken_ = true;
  }

  void time_out(Op& op, const std::string& why) {
    if (op.settled.load()) return;
    std::string message = op.description() + " timed out on rank " + std::to_string(op.group->rank) + " of group " +
                          op.group->name + " (world rank " + std::to_string(world_rank_) + "); " + why;
    // Broken first, then settle: a caller woken by the error must find the communicator broken.
    // (If the op completes in this instant, the communicator stays marked broken: conservative.)
    mark_broken(*op.group, "an earlier op timed out: " + message);
    if (op.settle(std::make_exception_ptr(TimeoutError(message)))) log("comm", LogLevel::kError, message);
  }

  void complete(Op& op) {
    std::exception_ptr error;
    try {
      if (op.on_success && !op.settled.load()) op.on_success();
    } catch (...) {
      error = std::current_exception();
    }
    release_tensors(op);
    op.settle(error);
  }

  // Note [Release before finish]: an op's closures hold references to its tensors. They are
  // dropped here, on this thread, before the Work completes: if the waiter's tensor were a Python
  // object and this thread dropped the last reference afterwards, it would need the GIL, which a
  // thread waiting on a later op may hold - a deadlock (seen in the engine's constructor).
  static void release_tensors(Op& op) {
    op.run = nullptr;
    op.start = nullptr;
    op.on_success = nullptr;
    op.exchange = nullptr;
  }

  void execute(const std::shared_ptr<Op>& op) {
    GroupState* g = op->group.get();
    if (g && g->broken.load()) {
      release_tensors(*op);
      op->settle(std::make_exception_ptr(CommError(op->description() + " cannot run: " + g->broken_message())));
      return;
    }
    try {
      if (op->point_to_point) {
        op->start(&op->request);
        std::lock_guard<std::mutex> lock(mutex_);
        p2p_.push_back(op);
        return;
      }
      thread_local std::vector<PendingSend> sends;  // reused: handed over (moved out) or empty at the end
      sends.clear();
      if (g && g->size > 1) announce(op, sends);
      // The caller-run path completes its own announcements; the progress thread polls the rest.
      struct HandOver {
        MpiRuntime* runtime;
        std::vector<PendingSend>& sends;
        ~HandOver() { runtime->hand_over_sends(sends); }
      } hand_over{this, sends};
      if (op->exchange && g && g->size > 1) {
        // Note [Caller-run collectives]: an all_to_all(v) travels as messages if any rank holds it
        // small (that rank sent them at once); only when none does is it one MPI_Alltoallv, entered
        // after every peer announced the same signature.
        bool settled = false;
        if (op->signature.flags & Signature::kEagerExchange) {
          settled = !run_exchange(*op);
        } else if (!await_peers(*op)) {
          settled = true;
        } else if (any_peer_eager(*op)) {
          settled = !run_exchange(*op);
        } else {
          op->run();
        }
        if (settled) {  // timed out, or a mismatch the watchdog saw: it settled the op
          release_tensors(*op);
          return;
        }
      } else if (op->caller_run) {
        if (g && g->size > 1 && !await_peers(*op)) {  // timed out: the watchdog settled it
          release_tensors(*op);
          return;
        }
        op->in_mpi.store(true);
        op->run();
        op->in_mpi.store(false);
      } else {
        op->run();
        if (g && g->size > 1 && signatures_checked().load(std::memory_order_relaxed)) verify_signatures(*op);
      }
    } catch (const CommError& e) {
      // An MPI error inside a mismatched collective (truncation, say) is reported as the mismatch.
      std::string message = e.what();
      if (g && g->size > 1 && message.rfind("collective mismatch", 0) != 0) {
        for (int i = 0; i < 200 && message.rfind("collective mismatch", 0) != 0; ++i) {
          bool all = false;
          std::string mismatch = compare_signatures(*op, &all);
          if (!mismatch.empty()) message = mismatch;
          if (all) break;
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
      }
      release_tensors(*op);
      if (message.rfind("collective mismatch", 0) == 0) {
        fail_mismatch(*op, message);
      } else {
        op->settle(std::current_exception());
      }
      return;
    } catch (...) {
      release_tensors(*op);
      op->settle(std::current_exception());
      return;
    }
    complete(*op);
    if (g && !op->caller_run) drain_arrivals(*g);  // caller-run: the next op's wait drains
  }

  void poll_background() {
    std::vector<std::shared_ptr<Op>> done;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < p2p_.size();) {
        int flag = 0;
        if (!p2p_[i]->settled.load()) MPI_Test(&p2p_[i]->request, &flag, MPI_STATUS_IGNORE);
        if (flag || p2p_[i]->settled.load()) {
          if (flag) done.push_back(p2p_[i]);
          p2p_[i] = p2p_.back();
          p2p_.pop_back();
        } else {
          ++i;
        }
      }
    }
    for (auto& op : done) complete(*op);
    std::lock_guard<std::mutex> lock(sends_mutex_);
    for (size_t i = 0; i < sends_.size();) {
      int flag = 0;
      MPI_Test(&sends_[i].request, &flag, MPI_STATUS_IGNORE);
      if (flag) {
        sends_[i] = sends_.back();
        sends_.pop_back();
      } else {
        ++i;
      }
    }
  }

  void progress_loop() {
    while (true) {
      std::shared_ptr<Op> op;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        // A caller-run op in progress (Note [Caller-run collectives]) holds the queue back.
        auto runnable = [&] { return !queue_.empty() && !current_; };
        if (!runnable() && p2p_.empty() && sends_pending() == 0)
          cv_.wait(lock, [&] { return !running_ || runnable() || sends_pending() > 0; });
        if (!running_ && queue_.empty()) break;
        if (runnable()) {
          op = queue_.front();
          queue_.pop_front();
          op->started = Clock::now();
          current_ = op;
        }
      }
      if (op) {
        execute(op);
        std::lock_guard<std::mutex> lock(mutex_);
        current_.reset();
      }
      poll_background();
      if (!op) std::this_thread::yield();  // only point-to-point ops or announcements in flight
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& op : p2p_) op->settle(std::make_exception_ptr(CommError(op->description() + " abandoned at shutdown")));
      p2p_.clear();
    }
    if (owns_mpi_ && !any_broken_) cancel_arrival_receives();
    if (owns_mpi_ && !any_broken_ && disconnect_dynamic_groups()) {
      for (auto& ops : half_ops_)
        for (auto& op : ops) MPI_Op_free(&op);
      MPI_Finalize();
    }
  }

  // The receives posted for announcements that will never come (before MPI_Finalize).
  void cancel_arrival_receives() {
    std::vector<std::shared_ptr<GroupState>> groups;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      groups.swap(groups_);
    }
    for (auto& g : groups) {
      std::lock_guard<std::mutex> lock(g->arrival_mutex);
      for (MPI_Request& request : g->arrival_requests) {
        if (request == MPI_REQUEST_NULL) continue;
        MPI_Cancel(&request);
        MPI_Wait(&request, MPI_STATUS_IGNORE);
      }
    }
  }

  // Processes joined by the rendezvous are separate MPI jobs, and with Open MPI 4 both
  // MPI_Comm_disconnect and MPI_Finalize can block forever in the PMIx fence between such jobs.
  // So: a barrier with a deadline makes sure no rank leaves while others still talk to it, then
  // the process leaves without finalizing (no mpirun is watching to object). Returns whether
  // MPI_Finalize may run.
  bool disconnect_dynamic_groups() {
    if (!dynamic_) return true;
    std::shared_ptr<GroupState> world = dynamic_groups_.empty() ? nullptr : dynamic_groups_.front().lock();
    if (world) {
      MPI_Request request;
      MPI_Ibarrier(world->comm, &request);
      int done = 0;
      for (auto deadline = Clock::now() + std::chrono::seconds(30); !done && Clock::now() < deadline;) {
        MPI_Test(&request, &done, MPI_STATUS_IGNORE);
        if (!done) std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      if (!done) log("comm", LogLevel::kWarn, "shutdown: not every rank reached shutdown within 30 s");
    }
    return false;
  }

 public:
  // Registers communicators that span processes joined by the rendezvous (see above).
  void register_dynamic(const std::shared_ptr<GroupState>& group) {
    std::lock_guard<std::mutex> lock(mutex_);
    dynamic_ = true;
    dynamic_groups_.push_back(group);
  }
  bool dynamic() const { return dynamic_; }

 private:

  void watchdog_loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (running_) {
      cv_.wait_for(lock, std::chrono::milliseconds(10));
      auto now = Clock::now();
      std::vector<std::shared_ptr<Op>> expired;
      if (current_ && now >= current_->deadline) expired.push_back(current_);
      for (auto& op : p2p_)
        if (now >= op->deadline) expired.push_back(op);
      std::vector<std::shared_ptr<Op>> queued_expired;
      for (auto& op : queue_)
        if (now >= op->deadline) queued_expired.push_back(op);
      std::shared_ptr<Op> blocker = current_;
      // A collective blocked inside MPI: compare the signatures that have arrived (Note
      // [Collective signatures]); a mismatch fails it now rather than at its deadline.
      std::shared_ptr<Op> running = (signatures_checked().load(std::memory_order_relaxed) && current_ &&
                                     !current_->point_to_point && current_->group &&
                                     current_->group->size > 1 && !current_->settled.load() &&
                                     now - current_->started >= std::chrono::milliseconds(20))
                                        ? current_
                                        : nullptr;
      if (expired.empty() && queued_expired.empty() && !running) continue;
      lock.unlock();  // MPI calls and logging below must not hold the queue lock
      if (running) {
        std::string mismatch = compare_signatures(*running, nullptr);
        if (!mismatch.empty()) fail_mismatch(*running, mismatch);
      }
      for (auto& op : expired) {
        if (!op->settled.load()) time_out(*op, missing_ranks(*op));
        if (op->caller_run && op->in_mpi.load()) {
          // Note [Caller-run collectives]: every peer entered, then one stopped inside the op.
          log("comm", LogLevel::kError, op->description(),
              " ran on the calling thread, which is blocked inside MPI and cannot be given the error; "
              "ending this process (exit code ", kCallerStuckExitCode, ")");
          std::_Exit(kCallerStuckExitCode);
        }
      }
      for (auto& op : queued_expired) {
        std::string why = blocker ? "it was queued behind " + blocker->description() + ", which has not completed"
                                  : "it was still queued";
        time_out(*op, why);
      }
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Op>> queue_;
  std::shared_ptr<Op> current_;
  std::vector<std::shared_ptr<Op>> p2p_;
  std::vector<std::shared_ptr<GroupState>> groups_;  // every group, for its posted receives
  bool running_ = false;
  std::thread progress_, watchdog_;
  std::mutex sends_mutex_;
  std::vector<PendingSend> sends_;  // announcements in flight; under sends_mutex_
  std::atomic<bool> any_broken_{false};
  bool owns_mpi_ = false;
  std::atomic<bool> dynamic_{false};
  std::vector<std::weak_ptr<GroupState>> dynamic_groups_;
  int world_rank_ = 0;
  MPI_Op half_ops_[2][3];
};

MPI_Datatype mpi_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kHalf:
    case at::kBFloat16: return MPI_UINT16_T;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kByte: return MPI_UINT8_T;
    default:
      throw CommError(std::string("backend mpi does not support dtype ") + c10::toString(dtype) +
                      " (supported: float32, float64, float16, bfloat16, int32, int64, uint8)");
  }
}

class MpiCommunicator : public Communicator, public std::enable_shared_from_this<MpiCommunicator> {
 public:
  MpiCommunicator(std::shared_ptr<GroupState> group, Timeout default_timeout)
      : group_(std::move(group)), default_timeout_(default_timeout) {}

  int rank() const override { return group_->rank; }
  int size() const override { return group_->size; }
  const std::string& name() const override { return group_->name; }
  const std::string& backend_name() const override {
    static const std::string kName = "mpi";
    return kName;
  }
  // Zero: the process-wide default (comm::default_timeout()), looked up when each op starts, so
  // a group cut before the engine read comms_timeout_s still follows it.
  Timeout default_timeout() const override {
    return default_timeout_.count() > 0 ? default_timeout_ : ::zeal::comm::default_timeout();
  }

  WorkPtr all_reduce(at::Tensor& tensor, const AllReduceOptions& opts) override {
    check_tensor(tensor, "all_reduce", "tensor");
    check_reduce(tensor, opts.op, "all_reduce");
    MPI_Op mpi_op = MpiRuntime::instance().reduce_op(tensor.scalar_type(), opts.op);
    auto op = make_op("all_reduce", tensor, opts.timeout, opts.site, static_cast<int>(opts.op));
    MPI_Comm comm = group_->comm;
    op->run = [tensor, mpi_op, comm] {
      MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, tensor.data_ptr(), count(tensor), mpi_dtype(tensor.scalar_type()), mpi_op,
                              comm));
    };
    if (opts.op == ReduceOp::kAvg) op->on_success = [tensor, n = size()]() mutable { tensor.div_(n); };
    op->caller_may_run = tensor.nbytes() <= kCallerRunBytes;
    return submit(op);
  }

  WorkPtr reduce_scatter(at::Tensor& output, const at::Tensor& input, const ReduceScatterOptions& opts) override {
    check_chunks(input, "input", output, "output", "reduce_scatter");
    check_reduce(input, opts.op, "reduce_scatter");
    MPI_Op mpi_op = MpiRuntime::instance().reduce_op(input.scalar_type(), opts.op);
    auto op = make_op("reduce_scatter", input, opts.timeout, opts.site, static_cast<int>(opts.op));
    MPI_Comm comm = group_->comm;
    op->run = [output, input, mpi_op, comm] {
      MPI_CHECK(MPI_Reduce_scatter_block(input.data_ptr(), output.data_ptr(), count(output),
                                         mpi_dtype(input.scalar_type()), mpi_op, comm));
    };
    if (opts.op == ReduceOp::kAvg) op->on_success = [output, n = size()]() mutable { output.div_(n); };
    op->caller_may_run = input.nbytes() <= kCallerRunBytes;
    return submit(op);
  }

  WorkPtr all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& opts) override {
    check_chunks(output, "output", input, "input", "all_gather");
    auto op = make_op("all_gather", input, opts.timeout, opts.site);
    MPI_Comm comm = group_->comm;
    op->run = [output, input, comm] {
      MPI_Datatype dt = mpi_dtype(input.scalar_type());
      MPI_CHECK(MPI_Allgather(input.data_ptr(), count(input), dt, output.data_ptr(), count(input), dt, comm));
    };
    op->caller_may_run = output.nbytes() <= kCallerRunBytes;
    return submit(op);
  }

  WorkPtr broadcast(at::Tensor& tensor, const BroadcastOptions& opts) override {
    check_tensor(tensor, "broadcast", "tensor");
    check_root(opts.root, "broadcast");
    auto op = make_op("broadcast", tensor, opts.timeout, opts.site, -1, opts.root);
    MPI_Comm comm = group_->comm;
    op->run = [tensor, root = opts.root, comm] {
      MPI_CHECK(MPI_Bcast(tensor.data_ptr(), count(tensor), mpi_dtype(tensor.scalar_type()), root, comm));
    };
    return submit(op);
  }

  WorkPtr reduce(at::Tensor& tensor, const ReduceOptions& opts) override {
    check_tensor(tensor, "reduce", "tensor");
    check_root(opts.root, "reduce");
    check_reduce(tensor, opts.op, "reduce");
    MPI_Op mpi_op = MpiRuntime::instance().reduce_op(tensor.scalar_type(), opts.op);
    auto op = make_op("reduce", tensor, opts.timeout, opts.site, static_cast<int>(opts.op), opts.root);
    MPI_Comm comm = group_->comm;
    bool is_root = opts.root == rank();
    // Non-roots reduce from a copy so their own tensor stays as it was.
    at::Tensor source = is_root ? tensor : tensor.clone();
    op->run = [tensor, source, is_root, root = opts.root, mpi_op, comm] {
      MPI_CHECK(MPI_Reduce(is_root ? MPI_IN_PLACE : source.data_ptr(), is_root ? tensor.data_ptr() : nullptr,
                           count(tensor), mpi_dtype(tensor.scalar_type()), mpi_op, root, comm));
    };
    if (opts.op == ReduceOp::kAvg && is_root) op->on_success = [tensor, n = size()]() mutable { tensor.div_(n); };
    return submit(op);
  }

  WorkPtr all_to_all(at::Tensor& output, const at::Tensor& input, const AllToAllOptions& opts) override {
    check_tensor(output, "all_to_all", "output");
    check_tensor(input, "all_to_all", "input");
    check_same_dtype(output, input, "all_to_all");
    AllToAllPlan plan = plan_all_to_all(output, input, opts, size());
    MPI_Comm comm = group_->comm;
    // MPI's counts and displacements are ints.
    auto to_int = [](const std::vector<int64_t>& v, const char* what) {
      std::vector<int> out;
      for (int64_t x : v) {
        ZEAL_CHECK_AS(CommError, x <= INT_MAX, "all_to_all: ", what, " of ", x,
                      " elements is beyond MPI_Alltoallv's int counts");
        out.push_back(static_cast<int>(x));
      }
      return out;
    };
    // Every rank's chunk, equal or not: MPI_Alltoall(v) reads it, and so does the exchange of
    // messages (run_exchange).
    auto x = std::make_shared<Exchange>();
    x->send = input;
    x->recv = output;
    x->dtype = mpi_dtype(input.scalar_type());
    x->send_counts = to_int(plan.send_counts, "a send count");
    x->send_offsets = to_int(plan.send_offsets, "a send offset");
    x->recv_counts = to_int(plan.recv_counts, "a receive count");
    x->recv_offsets = to_int(plan.recv_offsets, "a receive offset");
    auto op = make_op(plan.uneven ? "all_to_all_v" : "all_to_all", input, opts.timeout, opts.site);
    if (plan.uneven) {
      op->signature.count = plan.row;
      op->run = [x, comm] {
        MPI_CHECK(MPI_Alltoallv(x->send.data_ptr(), x->send_counts.data(), x->send_offsets.data(), x->dtype,
                                x->recv.data_ptr(), x->recv_counts.data(), x->recv_offsets.data(), x->dtype, comm));
      };
    } else {
      op->run = [x, comm] {
        MPI_CHECK(MPI_Alltoall(x->send.data_ptr(), x->send_counts[0], x->dtype, x->recv.data_ptr(), x->recv_counts[0],
                               x->dtype, comm));
      };
    }
    op->caller_may_run = std::max(input.nbytes(), output.nbytes()) <= kCallerRunBytes;
    if (size() > 1) {  // how it travels: see execute
      op->exchange = std::move(x);
      if (op->caller_may_run) op->signature.flags |= Signature::kEagerExchange;
    }
    return submit(op);
  }

  WorkPtr send(const at::Tensor& tensor, int dst, const SendRecvOptions& opts) override {
    check_tensor(tensor, "send", "tensor");
    check_peer(dst, "send");
    auto op = make_op("send", tensor, opts.timeout);
    op->point_to_point = true;
    op->peer = dst;
    MPI_Comm comm = group_->comm;
    op->start = [tensor, dst, tag = opts.tag, comm](MPI_Request* request) {
      MPI_CHECK(MPI_Isend(tensor.data_ptr(), count(tensor), mpi_dtype(tensor.scalar_type()), dst, tag, comm, request));
    };
    return submit(op);
  }

  WorkPtr recv(at::Tensor& tensor, int src, const SendRecvOptions& opts) override {
    check_tensor(tensor, "recv", "tensor");
    check_peer(src, "recv");
    auto op = make_op("recv", tensor, opts.timeout);
    op->point_to_point = true;
    op->peer = src;
    MPI_Comm comm = group_->comm;
    op->start = [tensor, src, tag = opts.tag, comm](MPI_Request* request) {
      MPI_CHECK(MPI_Irecv(tensor.data_ptr(), count(tensor), mpi_dtype(tensor.scalar_type()), src, tag, comm, request));
    };
    return submit(op);
  }

  WorkPtr barrier(const BarrierOptions& opts) override {
    auto op = make_op("barrier", at::Tensor(), opts.timeout, opts.site);
    MPI_Comm comm = group_->comm;
    op->run = [comm] { MPI_CHECK(MPI_Barrier(comm)); };
    op->caller_may_run = true;
    return submit(op);
  }

  std::shared_ptr<Communicator> split(const std::vector<int>& ranks, const std::string& name) override {
    ZEAL_CHECK_AS(CommError, !ranks.empty(), "split: the group of ranks is empty");
    int my_index = -1;
    for (size_t i = 0; i < ranks.size(); ++i) {
      ZEAL_CHECK_AS(CommError, ranks[i] >= 0 && ranks[i] < size(), "split: rank ", ranks[i],
                    " is outside group ", group_->name, " of size ", size());
      if (ranks[i] == rank()) my_index = static_cast<int>(i);
    }
    ZEAL_CHECK_AS(CommError, my_index >= 0, "split: rank ", rank(), " is not in the group it asked for");
    // Everyone must be present before the blocking MPI_Comm_split: a barrier with a deadline
    // turns a missing rank into a TimeoutError here instead of a hang inside MPI.
    barrier({})->wait();
    auto child = std::make_shared<GroupState>();
    child->name = name;
    auto parent = group_;
    MpiRuntime::instance().run_sync([&] {
      MPI_CHECK(MPI_Comm_split(parent->comm, ranks.front(), my_index, &child->comm));
      MPI_CHECK(MPI_Comm_dup(child->comm, &child->arrival_comm));
      MPI_Comm_set_errhandler(child->comm, MPI_ERRORS_RETURN);
      MPI_Comm_set_errhandler(child->arrival_comm, MPI_ERRORS_RETURN);
      MPI_Comm_rank(child->comm, &child->rank);
      MPI_Comm_size(child->comm, &child->size);
    });
    ZEAL_INTERNAL_ASSERT(child->size == static_cast<int>(ranks.size()), "split gave a group of ", child->size,
                         " ranks, expected ", ranks.size(), " (did every rank pass a consistent group?)");
    for (int r : ranks) child->world_ranks.push_back(parent->world_ranks[r]);
    MpiRuntime::instance().register_group(child);
    if (MpiRuntime::instance().dynamic()) MpiRuntime::instance().register_dynamic(child);
    return std::make_shared<MpiCommunicator>(child, default_timeout_);
  }

  static int count(const at::Tensor& t) { return static_cast<int>(t.numel()); }

 private:
  std::shared_ptr<Op> make_op(const std::string& name, const at::Tensor& t, Timeout timeout,
                              const std::string& site = {}, int reduce = -1, int root = -1) {
    auto op = std::make_shared<Op>();
    op->op_name = name;
    op->group = group_;
    if (t.defined()) {  // description() spells them out only when an error needs them
      op->numel = t.numel();
      op->dtype = t.scalar_type();
    }
    op->deadline = Clock::now() + (timeout.count() > 0 ? timeout : default_timeout());
    op->signature = Signature::of(name, t, site, reduce, root);
    return op;
  }

  WorkPtr submit(const std::shared_ptr<Op>& op) {
    op->work = std::make_shared<Work>(op->op_name + " on group " + group_->name);
    if (group_->broken.load())
      throw CommError(op->op_name + " on group " + group_->name + " cannot run: " + group_->broken_message());
    MpiRuntime::instance().submit(op);
    return op->work;
  }

  void check_tensor(const at::Tensor& t, const char* op, const char* what) const {
    ZEAL_CHECK_AS(CommError, t.defined(), op, ": ", what, " is undefined");
    ZEAL_CHECK_AS(CommError, t.device().is_cpu(), "backend mpi takes host tensors; ", op, " got ", what, " on ",
                  t.device().str(), " (device tensors go through the nccl backend)");
    ZEAL_CHECK_AS(CommError, t.is_contiguous(), op, ": ", what, " must be contiguous");
    ZEAL_CHECK_AS(CommError, t.numel() <= INT_MAX, op, ": ", what, " has ", t.numel(),
                  " elements; backend mpi handles at most 2^31-1 per call");
    mpi_dtype(t.scalar_type());
  }

  void check_reduce(const at::Tensor& t, ReduceOp op, const char* name) const {
    ZEAL_CHECK_AS(CommError, op != ReduceOp::kAvg || at::isFloatingType(t.scalar_type()), name,
                  ": reduce op avg needs a floating-point tensor, got ", c10::toString(t.scalar_type()));
  }

  // `whole` holds one chunk the size of `chunk` per rank of the group.
  void check_chunks(const at::Tensor& whole, const char* whole_name, const at::Tensor& chunk, const char* chunk_name,
                    const char* op) const {
    check_tensor(whole, op, whole_name);
    check_tensor(chunk, op, chunk_name);
    check_same_dtype(whole, chunk, op);
    ZEAL_CHECK_AS(CommError, whole.numel() == chunk.numel() * size(), op, ": ", whole_name, " has ", whole.numel(),
                  " elements; expected ", chunk_name, "'s ", chunk.numel(), " x group size ", size(), " = ",
                  chunk.numel() * size());
  }

  void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op) const {
    ZEAL_CHECK_AS(CommError, a.scalar_type() == b.scalar_type(), op, ": output dtype ", c10::toString(a.scalar_type()),
                  " differs from input dtype ", c10::toString(b.scalar_type()));
  }

  void check_root(int root, const char* op) const {
    ZEAL_CHECK_AS(CommError, root >= 0 && root < size(), op, ": root ", root, " is outside group ", group_->name,
                  " of size ", size());
  }

  void check_peer(int peer, const char* op) const {
    ZEAL_CHECK_AS(CommError, peer >= 0 && peer < size() && peer != rank(), op, ": peer ", peer,
                  " must be another rank of group ", group_->name, " (size ", size(), ", this rank ", rank(), ")");
  }

  std::shared_ptr<GroupState> group_;
  Timeout default_timeout_;
};

std::unique_ptr<Rendezvous>& rendezvous_holder() {
  static std::unique_ptr<Rendezvous> rendezvous;
  return rendezvous;
}

CommunicatorPtr make_world(MPI_Comm base, Timeout default_timeout, bool dynamic) {
  MpiRuntime& runtime = MpiRuntime::instance();
  auto group = std::make_shared<GroupState>();
  group->name = "world";
  runtime.run_sync([&] {
    MPI_CHECK(MPI_Comm_dup(base, &group->comm));
    MPI_CHECK(MPI_Comm_dup(base, &group->arrival_comm));
    MPI_Comm_set_errhandler(group->comm, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(group->arrival_comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(group->comm, &group->rank);
    MPI_Comm_size(group->comm, &group->size);
  });
  runtime.set_world_rank(group->rank);
  for (int r = 0; r < group->size; ++r) group->world_ranks.push_back(r);
  runtime.register_group(group);
  if (dynamic) {
    runtime.register_dynamic(group);
  }
  set_log_rank(group->rank);
  return std::make_shared<MpiCommunicator>(group, default_timeout);
}

}  // namespace

CommunicatorPtr mpi_world(Timeout default_timeout) { return make_world(MPI_COMM_WORLD, default_timeout, false); }

CommunicatorPtr mpi_world_rendezvous(const RankInfo& info, Timeout default_timeout) {
  auto& rendezvous = rendezvous_holder();
  // before MPI_Init; Timeout{0} means the process default (Note [One comms timeout])
  rendezvous = std::make_unique<Rendezvous>(info, default_timeout.count() > 0 ? default_timeout : comm::default_timeout());
  MPI_Comm base = MPI_COMM_NULL;
  MpiRuntime::instance().run_sync([&] {
    base = MPI_Comm_f2c(static_cast<MPI_Fint>(reinterpret_cast<intptr_t>(rendezvous->form_world())));
  });
  return make_world(base, default_timeout, true);
}

void inject_dropped_collective(const std::string& group_prefix, int64_t after) {
  InjectedFault& f = injected_fault();
  std::lock_guard<std::mutex> lock(f.mutex);
  f.group_prefix = group_prefix;
  f.countdown = after;
}

void set_signature_checks(bool on) { signatures_checked().store(on); }

void set_caller_runs(bool on) { caller_runs_enabled().store(on); }

void mpi_shutdown() {
  MpiRuntime::instance().shutdown();
  rendezvous_holder().reset();  // after MPI_Finalize: stops rank 0's ompi-server
}

}  // namespace zeal::comm
