// parallel_pieces: the CPU optimizers' way of spreading one pass over cores (private to src/optim).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

namespace zeal::optim {

// Pieces big enough to amortise a wake-up, small enough to balance across cores.
constexpr int64_t kGrain = 1 << 16;

// Note [One OpenMP runtime]: the pieces run on OpenMP threads of the runtime torch itself uses.
// torch's wheel ships its libgomp under the soname libgomp.so.1 and loads it first, so this
// library's libgomp.so.1 dependency resolves to the same runtime and the same thread pool.
// (A first version started its own std::threads: right after a torch op, torch's OpenMP worker
// was still spin-waiting on the other core, and at 10M parameters the CPU Adam step ran at half
// the speed of DeepSpeed's and torch's fused Adam; with OMP_WAIT_POLICY=PASSIVE all three were
// equal.) Each of up to at::get_num_threads() threads takes one contiguous, 64-element-aligned
// piece [begin, end) and its index t, so per-thread partial sums combine in a fixed order.
// (Round-robin tiles of 1 MiB per array instead of halves were slower here: 0.65x at 1e8.)
template <typename Fn>
void parallel_pieces(int64_t n, const Fn& run) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + kGrain - 1) / kGrain);
  if (threads <= 1) {
    run(0, n, 0);
    return;
  }
  const int64_t piece = ((n + threads - 1) / threads + 63) / 64 * 64;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t begin = std::min(n, t * piece), end = std::min(n, (t + 1) * piece);
    if (begin < end) run(begin, end, t);
  }
}

}  // namespace zeal::optim
