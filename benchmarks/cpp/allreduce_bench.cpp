// Collective bandwidth: Zeal's MPI backend against raw MPI, same sizes, same ranks, same process:
// all_reduce, all_gather and reduce_scatter against MPI_Allreduce, MPI_Allgather and
// MPI_Reduce_scatter_block, or (op all_to_all_v) the uneven all_to_all against MPI_Alltoallv with
// the same split sizes (rank i sends rank j a share proportional to (i + j) % n + 1 of its `bytes`).
// Prints one JSON object per (implementation, size) on rank 0; the Python harness
// (benchmarks/allreduce.py) turns them into a table and a JSON file.
//   mpirun -np 2 build/py/benchmarks/zeal_allreduce_bench [max_bytes] [all_reduce|all_gather|reduce_scatter|all_to_all_v]
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>

#include "zeal/comm/mpi_backend.h"
#include "zeal/comm/world.h"

namespace {

using Clock = std::chrono::steady_clock;
enum class Op { kAllReduce, kAllGather, kReduceScatter, kAllToAllV };

// Iterations for a size: enough to last ~0.2 s, at least 5.
int iterations_for(size_t bytes) { return static_cast<int>(std::clamp<size_t>((200u << 20) / std::max<size_t>(bytes, 4096), 5, 2000)); }

// The uneven exchange: elements rank i sends rank j (every rank computes the same matrix).
struct Exchange {
  std::vector<int> send_counts, send_offsets, recv_counts, recv_offsets;
  int send_total = 0, recv_total = 0;
  Exchange(int count, int rank, int n) {
    auto elements = [&](int i, int j) { return std::max(1, count * ((i + j) % n + 1) / (n * (n + 1) / 2)); };
    for (int j = 0; j < n; ++j) {
      send_offsets.push_back(send_total);
      send_counts.push_back(elements(rank, j));
      send_total += send_counts.back();
      recv_offsets.push_back(recv_total);
      recv_counts.push_back(elements(j, rank));
      recv_total += recv_counts.back();
    }
  }
};

// One size of one op: the buffers both implementations use. `bytes` is nccl-tests' size: the
// all_reduce buffer, the all_gather output, the reduce_scatter input, what a rank sends in all_to_all.
struct Case {
  Op op;
  int n, count;
  Exchange x;
  at::Tensor a, b;
  Case(Op op, size_t bytes, int rank, int n) : op(op), n(n), count(static_cast<int>(bytes / 4)), x(count, rank, n) {
    int chunk = std::max(1, count / n);
    switch (op) {
      case Op::kAllReduce: a = at::ones({count}, at::kFloat); break;
      case Op::kAllGather: a = at::ones({chunk}, at::kFloat), b = at::empty({chunk * n}, at::kFloat); break;
      case Op::kReduceScatter: a = at::ones({chunk * n}, at::kFloat), b = at::empty({chunk}, at::kFloat); break;
      case Op::kAllToAllV: a = at::ones({x.send_total}, at::kFloat), b = at::empty({x.recv_total}, at::kFloat); break;
    }
  }

  void raw(MPI_Comm comm) {
    switch (op) {
      case Op::kAllReduce: MPI_Allreduce(MPI_IN_PLACE, a.data_ptr(), count, MPI_FLOAT, MPI_SUM, comm); break;
      case Op::kAllGather:
        MPI_Allgather(a.data_ptr(), a.numel(), MPI_FLOAT, b.data_ptr(), a.numel(), MPI_FLOAT, comm);
        break;
      case Op::kReduceScatter: MPI_Reduce_scatter_block(a.data_ptr(), b.data_ptr(), b.numel(), MPI_FLOAT, MPI_SUM, comm); break;
      case Op::kAllToAllV:
        MPI_Alltoallv(a.data_ptr(), x.send_counts.data(), x.send_offsets.data(), MPI_FLOAT, b.data_ptr(),
                      x.recv_counts.data(), x.recv_offsets.data(), MPI_FLOAT, comm);
        break;
    }
  }

  zeal::comm::WorkPtr zeal(zeal::comm::Communicator& comm) {
    switch (op) {
      case Op::kAllReduce: return comm.all_reduce(a, {zeal::comm::ReduceOp::kSum});
      case Op::kAllGather: return comm.all_gather(b, a, {});
      case Op::kReduceScatter: return comm.reduce_scatter(b, a, {zeal::comm::ReduceOp::kSum});
      case Op::kAllToAllV: {
        zeal::comm::AllToAllOptions opts;
        opts.input_split_sizes.assign(x.send_counts.begin(), x.send_counts.end());
        opts.output_split_sizes.assign(x.recv_counts.begin(), x.recv_counts.end());
        return comm.all_to_all(b, a, opts);
      }
    }
    return nullptr;
  }

  // nccl-tests' bus bandwidth factor: all-reduce moves 2(n-1)/n of the data per rank, the others (n-1)/n.
  double bus_factor() const { return (op == Op::kAllReduce ? 2.0 : 1.0) * (n - 1) / n; }
};

double time_raw(Case& c, int iters, MPI_Comm comm) {
  MPI_Barrier(comm);
  auto start = Clock::now();
  for (int i = 0; i < iters; ++i) c.raw(comm);
  double local = std::chrono::duration<double>(Clock::now() - start).count() / iters, worst = 0;
  MPI_Allreduce(&local, &worst, 1, MPI_DOUBLE, MPI_MAX, comm);
  return worst;
}

double time_zeal(Case& c, zeal::comm::Communicator& comm, int iters) {
  comm.barrier({})->wait();
  auto start = Clock::now();
  for (int i = 0; i < iters; ++i) c.zeal(comm)->wait();
  at::Tensor elapsed = at::full({1}, std::chrono::duration<double>(Clock::now() - start).count() / iters, at::kDouble);
  comm.all_reduce(elapsed, {zeal::comm::ReduceOp::kMax})->wait();
  return elapsed.item<double>();
}

Op parse_op(const char* name) {
  if (std::strcmp(name, "all_reduce") == 0) return Op::kAllReduce;
  if (std::strcmp(name, "all_gather") == 0) return Op::kAllGather;
  if (std::strcmp(name, "reduce_scatter") == 0) return Op::kReduceScatter;
  if (std::strcmp(name, "all_to_all_v") == 0) return Op::kAllToAllV;
  std::fprintf(stderr, "unknown op %s (all_reduce, all_gather, reduce_scatter, all_to_all_v)\n", name);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  size_t max_bytes = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : (64u << 20);
  const char* op_name = argc > 2 ? argv[2] : "all_reduce";
  const Op op = parse_op(op_name);
  auto world = zeal::comm::world(zeal::comm::Timeout(120000));  // initializes MPI (thread multiple)
  MPI_Comm raw;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw);
  const int n = world->size();
  for (size_t bytes = 4; bytes <= max_bytes; bytes *= 4) {
    if (op != Op::kAllReduce && op != Op::kAllToAllV && bytes < 4u * n) continue;  // a chunk per rank
    int iters = iterations_for(bytes);
    Case c(op, bytes, world->rank(), n);
    // Warm up both paths, then alternate so drift in machine load hits both alike.
    time_raw(c, 2, raw);
    time_zeal(c, *world, 2);
    // "zeal": as in training (collective signatures checked, small ops run by the caller);
    // "zeal_nosig" without the signature check and "zeal_queued" with every op handed to the
    // progress thread, to show what each costs (Notes [Collective signatures] and [Caller-run
    // collectives] in mpi_backend.cpp).
    double raw_s = 1e30, zeal_s = 1e30, nosig_s = 1e30, queued_s = 1e30;
    for (int round = 0; round < 3; ++round) {
      raw_s = std::min(raw_s, time_raw(c, iters, raw));
      zeal_s = std::min(zeal_s, time_zeal(c, *world, iters));
      zeal::comm::set_signature_checks(false);
      nosig_s = std::min(nosig_s, time_zeal(c, *world, iters));
      zeal::comm::set_signature_checks(true);
      zeal::comm::set_caller_runs(false);
      queued_s = std::min(queued_s, time_zeal(c, *world, iters));
      zeal::comm::set_caller_runs(true);
    }
    if (world->rank() == 0) {
      for (auto [name, seconds] : {std::pair<const char*, double>{"mpi", raw_s},
                                   {"zeal", zeal_s},
                                   {"zeal_nosig", nosig_s},
                                   {"zeal_queued", queued_s}}) {
        double algbw = bytes / seconds / 1e9;
        std::printf("{\"impl\": \"%s\", \"op\": \"%s\", \"ranks\": %d, \"bytes\": %zu, \"iters\": %d, "
                    "\"time_us\": %.3f, \"algbw_GBps\": %.4f, \"busbw_GBps\": %.4f}\n",
                    name, op_name, n, bytes, iters, seconds * 1e6, algbw, algbw * c.bus_factor());
      }
      std::fflush(stdout);
    }
  }
  MPI_Comm_free(&raw);
  world.reset();
  zeal::comm::shutdown();
  return 0;
}
