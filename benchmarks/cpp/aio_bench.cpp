// Zeal's swap I/O on its own: one swap file of the given size written whole and read back whole
// through SwapStore (io_uring workers, O_DIRECT, checksums verified on read), a JSON line per
// transfer. benchmarks/aio.py runs it beside fio and dd.
//   zeal_aio_bench DIR BYTES BLOCK_SIZE QUEUE_DEPTH THREADS ROUNDS [single_submit] [no_overlap]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "zeal/offload/swap_store.h"

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s DIR BYTES BLOCK_SIZE QUEUE_DEPTH THREADS ROUNDS [single_submit] [no_overlap]\n",
                 argv[0]);
    return 2;
  }
  zeal::AioConfig c;
  const int64_t bytes = zeal::offload::align_up(std::atoll(argv[2]));
  c.block_size = std::atoll(argv[3]);
  c.queue_depth = std::atoll(argv[4]);
  c.thread_count = std::atoll(argv[5]);
  const int rounds = std::atoi(argv[6]);
  for (int i = 7; i < argc; ++i) {
    if (std::strcmp(argv[i], "single_submit") == 0) c.single_submit = true;
    if (std::strcmp(argv[i], "no_overlap") == 0) c.overlap_events = false;
  }
  zeal::offload::SwapStore store(argv[1], "benchmark", c);
  store.check_free_space(bytes);
  const int64_t file = store.add_file("bench.swp", bytes);
  char* buffer = static_cast<char*>(std::aligned_alloc(zeal::offload::kIoAlignment, static_cast<size_t>(bytes)));
  std::mt19937_64 gen(1);
  for (int64_t i = 0; i < bytes / 8; ++i) reinterpret_cast<uint64_t*>(buffer)[i] = gen();
  using Clock = std::chrono::steady_clock;
  // The first write turns the reserved (unwritten) extents into written ones, as the engine's
  // initialisation does once; training steps overwrite, which is what the rounds measure.
  auto start = Clock::now();
  store.finish_write(file, store.write(file, buffer));
  std::printf("{\"op\": \"first_write\", \"bytes\": %lld, \"seconds\": %.6f}\n", static_cast<long long>(bytes),
              std::chrono::duration<double>(Clock::now() - start).count());
  for (int r = 0; r < rounds; ++r) {
    auto t0 = Clock::now();
    store.finish_write(file, store.write(file, buffer));
    auto t1 = Clock::now();
    store.finish_read(file, store.read(file, buffer));
    auto t2 = Clock::now();
    std::printf("{\"op\": \"write\", \"bytes\": %lld, \"seconds\": %.6f}\n", static_cast<long long>(bytes),
                std::chrono::duration<double>(t1 - t0).count());
    std::printf("{\"op\": \"read\", \"bytes\": %lld, \"seconds\": %.6f}\n", static_cast<long long>(bytes),
                std::chrono::duration<double>(t2 - t1).count());
    std::fflush(stdout);
  }
  std::free(buffer);
  return 0;
}
