// Collective bandwidth: Zeal's MPI backend against raw MPI, same sizes, same ranks, same process:
// all_reduce against MPI_Allreduce, or (op all_to_all_v) the uneven all_to_all against
// MPI_Alltoallv with the same split sizes (rank i sends rank j a share proportional to
// (i + j) % n + 1 of its `bytes`). Prints one JSON object per (implementation, size) on rank 0;
// the Python harness (benchmarks/allreduce.py) turns them into a table and a JSON file.
//   mpirun -np 2 build/py/benchmarks/zeal_allreduce_bench [max_bytes] [all_reduce|all_to_all_v]
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

// Iterations for a size: enough to last ~0.2 s, at least 5.
int iterations_for(size_t bytes) { return static_cast<int>(std::clamp<size_t>((200u << 20) / std::max<size_t>(bytes, 4096), 5, 2000)); }

double time_raw(float* data, int count, int iters, MPI_Comm comm) {
  MPI_Barrier(comm);
  auto start = Clock::now();
  for (int i = 0; i < iters; ++i) MPI_Allreduce(MPI_IN_PLACE, data, count, MPI_FLOAT, MPI_SUM, comm);
  double local = std::chrono::duration<double>(Clock::now() - start).count() / iters, worst = 0;
  MPI_Allreduce(&local, &worst, 1, MPI_DOUBLE, MPI_MAX, comm);
  return worst;
}

double time_zeal(zeal::comm::Communicator& comm, at::Tensor& t, int iters) {
  comm.barrier({})->wait();
  auto start = Clock::now();
  for (int i = 0; i < iters; ++i) comm.all_reduce(t, {zeal::comm::ReduceOp::kSum})->wait();
  at::Tensor elapsed = at::full({1}, std::chrono::duration<double>(Clock::now() - start).count() / iters, at::kDouble);
  comm.all_reduce(elapsed, {zeal::comm::ReduceOp::kMax})->wait();
  return elapsed.item<double>();
}

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

double time_raw_v(const Exchange& x, at::Tensor& in, at::Tensor& out, int iters, MPI_Comm comm) {
  MPI_Barrier(comm);
  auto start = Clock::now();
  for (int i = 0; i < iters; ++i)
    MPI_Alltoallv(in.data_ptr(), x.send_counts.data(), x.send_offsets.data(), MPI_FLOAT, out.data_ptr(),
                  x.recv_counts.data(), x.recv_offsets.data(), MPI_FLOAT, comm);
  double local = std::chrono::duration<double>(Clock::now() - start).count() / iters, worst = 0;
  MPI_Allreduce(&local, &worst, 1, MPI_DOUBLE, MPI_MAX, comm);
  return worst;
}

double time_zeal_v(zeal::comm::Communicator& comm, const Exchange& x, at::Tensor& in, at::Tensor& out, int iters) {
  zeal::comm::AllToAllOptions opts;
  opts.input_split_sizes.assign(x.send_counts.begin(), x.send_counts.end());
  opts.output_split_sizes.assign(x.recv_counts.begin(), x.recv_counts.end());
  comm.barrier({})->wait();
  auto start = Clock::now();
  for (int i = 0; i < iters; ++i) comm.all_to_all(out, in, opts)->wait();
  at::Tensor elapsed = at::full({1}, std::chrono::duration<double>(Clock::now() - start).count() / iters, at::kDouble);
  comm.all_reduce(elapsed, {zeal::comm::ReduceOp::kMax})->wait();
  return elapsed.item<double>();
}

}  // namespace

int main(int argc, char** argv) {
  size_t max_bytes = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : (64u << 20);
  const bool uneven = argc > 2 && std::strcmp(argv[2], "all_to_all_v") == 0;
  auto world = zeal::comm::world(zeal::comm::Timeout(120000));  // initializes MPI (thread multiple)
  MPI_Comm raw;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw);
  const int n = world->size();
  for (size_t bytes = 4; bytes <= max_bytes; bytes *= 4) {
    int count = static_cast<int>(bytes / 4);
    int iters = iterations_for(bytes);
    at::Tensor t = at::ones({count}, at::kFloat);
    Exchange x(count, world->rank(), n);
    at::Tensor in = at::ones({x.send_total}, at::kFloat), out = at::empty({x.recv_total}, at::kFloat);
    auto raw_time = [&](int it) {
      return uneven ? time_raw_v(x, in, out, it, raw) : time_raw(t.data_ptr<float>(), count, it, raw);
    };
    auto zeal_time = [&](int it) { return uneven ? time_zeal_v(*world, x, in, out, it) : time_zeal(*world, t, it); };
    // Warm up both paths, then alternate so drift in machine load hits both alike.
    raw_time(2);
    zeal_time(2);
    // "zeal" checks collective signatures (always on in training); "zeal_nosig" measures without
    // the check, to show its cost (Note [Collective signatures]).
    double raw_s = 1e30, zeal_s = 1e30, nosig_s = 1e30;
    for (int round = 0; round < 3; ++round) {
      raw_s = std::min(raw_s, raw_time(iters));
      zeal_s = std::min(zeal_s, zeal_time(iters));
      zeal::comm::set_signature_checks(false);
      nosig_s = std::min(nosig_s, zeal_time(iters));
      zeal::comm::set_signature_checks(true);
    }
    if (world->rank() == 0) {
      for (auto [name, seconds] :
           {std::pair<const char*, double>{"mpi", raw_s}, {"zeal", zeal_s}, {"zeal_nosig", nosig_s}}) {
        // nccl-tests' bus bandwidth: all-reduce moves 2(n-1)/n of the data per rank, all-to-all (n-1)/n.
        double algbw = bytes / seconds / 1e9;
        std::printf("{\"impl\": \"%s\", \"op\": \"%s\", \"ranks\": %d, \"bytes\": %zu, \"iters\": %d, "
                    "\"time_us\": %.3f, \"algbw_GBps\": %.4f, \"busbw_GBps\": %.4f}\n",
                    name, uneven ? "all_to_all_v" : "all_reduce", n, bytes, iters, seconds * 1e6, algbw,
                    algbw * (uneven ? 1.0 : 2.0) * (n - 1) / n);
      }
      std::fflush(stdout);
    }
  }
  MPI_Comm_free(&raw);
  world.reset();
  zeal::comm::shutdown();
  return 0;
}
