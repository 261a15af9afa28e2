// The offload layer on its own: the io_uring pool, the swap store and the optimizer swapper,
// against real files in a temporary directory.
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "zeal/core/error.h"
#include "zeal/offload/aio.h"
#include "zeal/offload/optimizer_swapper.h"
#include "zeal/offload/swap_store.h"

namespace fs = std::filesystem;
using namespace zeal;
using namespace zeal::offload;

namespace {

struct TempDir {
  TempDir() {
    char pattern[] = "/tmp/zeal-offload-test-XXXXXX";
    path = ::mkdtemp(pattern);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string path;
};

struct Aligned {
  explicit Aligned(int64_t bytes) : bytes(bytes) {
    data = static_cast<char*>(std::aligned_alloc(kIoAlignment, static_cast<size_t>(std::max<int64_t>(bytes, kIoAlignment))));
  }
  ~Aligned() { std::free(data); }
  char* data;
  int64_t bytes;
};

void fill_random(Aligned& b, unsigned seed) {
  std::mt19937 gen(seed);
  for (int64_t i = 0; i < b.bytes; ++i) b.data[i] = static_cast<char>(gen());
}

}  // namespace

// (thread_count, queue_depth, block_size, single_submit, overlap_events) x sizes, including 0 and a
// size that is not a multiple of the block.
class AioRoundTrip : public ::testing::TestWithParam<std::tuple<int, int, int, bool, bool>> {};

TEST_P(AioRoundTrip, WritesThenReadsBackEveryByteWithMatchingChecksums) {
  auto [threads, depth, block, single, overlap] = GetParam();
  AioConfig c;
  c.thread_count = threads;
  c.queue_depth = depth;
  c.block_size = block;
  c.single_submit = single;
  c.overlap_events = overlap;
  TempDir dir;
  SwapStore store(dir.path, "test", c);
  for (int64_t bytes : {int64_t{0}, int64_t{4096}, int64_t{13 * 4096}, int64_t{1 << 20}}) {
    int64_t f = store.add_file("f" + std::to_string(bytes), bytes);
    Aligned out(bytes), in(bytes);
    fill_random(out, static_cast<unsigned>(bytes));
    store.finish_write(f, store.write(f, out.data));
    std::memset(in.data, 0, static_cast<size_t>(bytes));
    store.finish_read(f, store.read(f, in.data));
    EXPECT_EQ(std::memcmp(in.data, out.data, static_cast<size_t>(bytes)), 0) << bytes << " bytes";
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, AioRoundTrip,
                         ::testing::Values(std::make_tuple(1, 1, 4096, false, true),
                                           std::make_tuple(1, 8, 8192, true, true),
                                           std::make_tuple(3, 4, 4096, false, false),
                                           std::make_tuple(2, 2, 65536, true, false),
                                           std::make_tuple(4, 16, 1048576, false, true)));

TEST(SwapStore, RewrittenFileFailsItsChecksumAndNamesTheFile) {
  TempDir dir;
  AioConfig c;
  c.block_size = 4096;
  SwapStore store(dir.path, "test", c);
  int64_t f = store.add_file("state.swp", 3 * 4096);
  Aligned out(3 * 4096), in(3 * 4096);
  fill_random(out, 7);
  store.finish_write(f, store.write(f, out.data));
  int fd = ::open(store.path(f).c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  char junk[4] = {1, 2, 3, 4};
  ASSERT_EQ(::pwrite(fd, junk, 4, 2 * 4096 + 100), 4);
  ::close(fd);
  try {
    store.finish_read(f, store.read(f, in.data));
    FAIL() << "a rewritten swap file was accepted";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(store.path(f)), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("checksum mismatch"), std::string::npos) << e.what();
  }
}

TEST(SwapStore, TruncatedFileIsAShortReadWithOffsetAndCounts) {
  TempDir dir;
  AioConfig c;
  c.block_size = 8192;
  SwapStore store(dir.path, "test", c);
  int64_t f = store.add_file("state.swp", 4 * 4096);
  Aligned out(4 * 4096), in(4 * 4096);
  fill_random(out, 9);
  store.finish_write(f, store.write(f, out.data));
  ASSERT_EQ(::truncate(store.path(f).c_str(), 3 * 4096), 0);
  try {
    store.finish_read(f, store.read(f, in.data));
    FAIL() << "a truncated swap file was accepted";
  } catch (const IoError& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("short read of " + store.path(f) + " at offset 8192 (8192 bytes): 4096 bytes read"),
              std::string::npos) << m;
  }
}

TEST(SwapStore, FilesAndDirectoryAreRemovedWithTheStore) {
  TempDir dir;
  std::string made;
  {
    SwapStore store(dir.path, "test", AioConfig{});
    store.add_file("a.swp", 4096);
    made = store.dir();
    EXPECT_TRUE(fs::exists(made + "/a.swp"));
  }
  EXPECT_FALSE(fs::exists(made));
  EXPECT_TRUE(fs::is_empty(dir.path));
}

TEST(SwapStore, MissingPathAndImpossibleSpaceAreIoErrors) {
  TempDir dir;
  EXPECT_THROW(SwapStore(dir.path + "/missing", "test", AioConfig{}), IoError);
  SwapStore store(dir.path, "test", AioConfig{});
  EXPECT_THROW(store.check_free_space(int64_t{1} << 60), IoError);
}

TEST(Aio, BadConfigIsAConfigError) {
  AioConfig c;
  c.block_size = 1000;
  EXPECT_THROW(AioEngine{c}, ConfigError);
  c.block_size = 4096;
  c.queue_depth = 0;
  EXPECT_THROW(AioEngine{c}, ConfigError);
}

class SwapperPipelines : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

// Values written in one pass come back in the next, sub-group by sub-group, whatever the overlap:
// a buffer set reused before its write finished, or a read landing in the wrong set, would not.
TEST_P(SwapperPipelines, EverySubGroupKeepsItsOwnValuesAcrossPasses) {
  TempDir dir;
  NvmeSwapConfig c;
  c.nvme_path = dir.path;
  c.sub_group_size = 1000;
  c.buffer_count = 3;
  std::tie(c.pipeline_read, c.pipeline_write) = GetParam();
  c.aio.block_size = 4096;
  c.aio.thread_count = 2;
  const int64_t n = 5500;  // six sub-groups, the last one short
  OptimizerSwapper swapper(c, n, {"master", "exp_avg", "exp_avg_sq"});
  ASSERT_EQ(swapper.num_sub_groups(), 6);
  EXPECT_EQ(swapper.end(5) - swapper.begin(5), 500);
  auto expected = [&](int64_t k, size_t j, int pass) {
    return at::arange(swapper.begin(k), swapper.end(k), at::kFloat) * static_cast<double>(j + 1) + pass;
  };
  swapper.for_each(
      [&](int64_t k, std::vector<at::Tensor>& views) {
        for (size_t j = 0; j < views.size(); ++j) views[j].copy_(expected(k, j, 0));
      },
      false, true);
  for (int pass = 1; pass <= 3; ++pass) {
    swapper.for_each(
        [&](int64_t k, std::vector<at::Tensor>& views) {
          for (size_t j = 0; j < views.size(); ++j) {
            ASSERT_TRUE(at::equal(views[j], expected(k, j, pass - 1))) << "sub-group " << k << " tensor " << j;
            views[j].add_(1.0);
          }
        },
        true, true);
  }
  EXPECT_EQ(swapper.swap_bytes(), 5 * 3 * align_up(4000) + 3 * align_up(2000));
}

INSTANTIATE_TEST_SUITE_P(ReadWrite, SwapperPipelines,
                         ::testing::Values(std::make_tuple(false, false), std::make_tuple(true, false),
                                           std::make_tuple(false, true), std::make_tuple(true, true)));

TEST(Swapper, HostBuffersBeyondAvailableMemoryAreRefusedUpFront) {
  TempDir dir;
  NvmeSwapConfig c;
  c.nvme_path = dir.path;
  c.sub_group_size = int64_t{1} << 40;  // 4 TiB per tensor
  c.pipeline_read = true;
  try {
    OptimizerSwapper swapper(c, int64_t{1} << 40, {"master", "exp_avg", "exp_avg_sq"});
    FAIL() << "12 TiB of buffers were accepted";
  } catch (const ConfigError& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("'zero_optimization.sub_group_size'"), std::string::npos) << m;
    EXPECT_NE(m.find("available"), std::string::npos) << m;
  }
  EXPECT_TRUE(fs::is_empty(dir.path));  // refused before any file was made
}
