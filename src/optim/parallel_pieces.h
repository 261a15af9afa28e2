// parallel_pieces: the CPU optimizers' way of spreading one pass over cores (private to src/optim).
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>

namespace zeal::optim {

// Pieces big enough to amortise a thread's start, small enough to balance across cores.
constexpr int64_t kGrain = 1 << 16;

// Note [Own threads]: at::parallel_for is inline OpenMP in the headers and runs serially in a
// library built without -fopenmp, and linking a second OpenMP runtime beside torch's is worse.
// So: as many threads as torch's intra-op setting allows, each on one contiguous, 64-element-
// aligned piece [begin, end); the calling thread takes the first. Returns after all finish.
template <typename Fn>
void parallel_pieces(int64_t n, const Fn& run) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + kGrain - 1) / kGrain);
  if (threads <= 1) {
    run(0, n, 0);
    return;
  }
  const int64_t piece = ((n + threads - 1) / threads + 63) / 64 * 64;
  std::vector<std::thread> workers;
  for (int64_t t = 1; t < threads; ++t) {
    int64_t begin = std::min(n, t * piece), end = std::min(n, (t + 1) * piece);
    if (begin < end) workers.emplace_back(run, begin, end, t);
  }
  run(0, std::min(n, piece), 0);
  for (auto& w : workers) w.join();
}

}  // namespace zeal::optim
