// all_reduce bandwidth: Zeal's MPI backend against raw MPI_Allreduce, same sizes, same ranks,
// same process. Prints one JSON object per (implementation, size) on rank 0; the Python harness
// (benchmarks/allreduce.py) turns them into a table and a JSON file.
//   mpirun -np 2 build/py/benchmarks/cpp/zeal_allreduce_bench [max_bytes]
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
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

}  // namespace

int main(int argc, char** argv) {
  size_t max_bytes = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : (64u << 20);
  auto world = zeal::comm::world(zeal::comm::Timeout(120000));  // initializes MPI (thread multiple)
  MPI_Comm raw;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw);
  const int n = world->size();
  for (size_t bytes = 4; bytes <= max_bytes; bytes *= 4) {
    int count = static_cast<int>(bytes / 4);
    int iters = iterations_for(bytes);
    at::Tensor t = at::ones({count}, at::kFloat);
    // Warm up both paths, then alternate so drift in machine load hits both alike.
    time_raw(t.data_ptr<float>(), count, 2, raw);
    time_zeal(*world, t, 2);
    // "zeal" checks collective signatures (always on in training); "zeal_nosig" measures without
    // the check, to show its cost (Note [Collective signatures]).
    double raw_s = 1e30, zeal_s = 1e30, nosig_s = 1e30;
    for (int round = 0; round < 3; ++round) {
      raw_s = std::min(raw_s, time_raw(t.data_ptr<float>(), count, iters, raw));
      zeal_s = std::min(zeal_s, time_zeal(*world, t, iters));
      zeal::comm::set_signature_checks(false);
      nosig_s = std::min(nosig_s, time_zeal(*world, t, iters));
      zeal::comm::set_signature_checks(true);
    }
    if (world->rank() == 0) {
      for (auto [name, seconds] :
           {std::pair<const char*, double>{"mpi", raw_s}, {"zeal", zeal_s}, {"zeal_nosig", nosig_s}}) {
        double algbw = bytes / seconds / 1e9;
        std::printf("{\"impl\": \"%s\", \"ranks\": %d, \"bytes\": %zu, \"iters\": %d, \"time_us\": %.3f, "
                    "\"algbw_GBps\": %.4f, \"busbw_GBps\": %.4f}\n",
                    name, n, bytes, iters, seconds * 1e6, algbw, algbw * 2.0 * (n - 1) / n);
      }
      std::fflush(stdout);
    }
  }
  MPI_Comm_free(&raw);
  world.reset();
  zeal::comm::shutdown();
  return 0;
}
