// Communicator tests on real ranks: run under `mpirun -np N` (N = 1..4, see CMakeLists.txt).
// Every op x every dtype x sizes 0, 1, odd and larger than a gradient bucket.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <thread>

#include <ATen/ATen.h>

#include "zeal/parallel/mesh.h"
#include "zeal/parallel/process_groups.h"
#include "zeal/comm/world.h"
#include "zeal/core/error.h"

using namespace zeal;
using namespace zeal::comm;

namespace {

CommunicatorPtr g_world;

const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16,
                                             at::kInt,   at::kLong,   at::kByte};
// 0, 1, odd, and larger than the 256 Ki-element buckets the engine tests use.
const std::vector<int64_t> kSizes = {0, 1, 7, (1 << 18) + 3};

// Element i of rank r's input: small integers, exact in every dtype, sums below 256.
at::Tensor pattern(int64_t n, int rank, at::ScalarType dtype) {
  return (at::arange(n, at::kLong).remainder(5) + (rank + 1)).to(dtype);
}

void expect_equal(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.numel(), want.numel()) << what;
  EXPECT_TRUE(at::equal(got.to(at::kDouble), want.to(at::kDouble))) << what;
}

std::string name(at::ScalarType t, int64_t n) { return std::string(c10::toString(t)) + " x " + std::to_string(n); }

}  // namespace

TEST(Comm, AllReduceEveryOpDtypeSize) {
  const int n = g_world->size();
  for (auto dtype : kDtypes)
    for (int64_t size : kSizes)
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin, ReduceOp::kAvg}) {
        if (op == ReduceOp::kAvg && !at::isFloatingType(dtype)) continue;
        at::Tensor t = pattern(size, g_world->rank(), dtype);
        g_world->all_reduce(t, {op})->wait();
        at::Tensor base = at::arange(size, at::kLong).remainder(5).to(at::kDouble);
        at::Tensor want = op == ReduceOp::kSum   ? base * n + n * (n + 1) / 2
                          : op == ReduceOp::kMax ? base + n
                          : op == ReduceOp::kMin ? base + 1
                                                 : base + (n + 1) / 2.0;
        expect_equal(t, want.to(dtype), std::string("all_reduce ") + to_string(op) + " " + name(dtype, size));
      }
}

TEST(Comm, AvgOnIntegersIsRejected) {
  at::Tensor t = at::ones({3}, at::kInt);
  EXPECT_THROW(g_world->all_reduce(t, {ReduceOp::kAvg}), CommError);
}

TEST(Comm, HalfSumIsRoundedPerStepNotTruncated) {
  // 0.1 is inexact in fp16/bf16; the sum must equal a sequential fp32-widened reduction of the
  // 16-bit inputs, to within one 16-bit rounding per step.
  const int n = g_world->size();
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    at::Tensor t = at::full({5}, 0.1, dtype);
    g_world->all_reduce(t, {ReduceOp::kSum})->wait();
    double exact = 0.1 * n;
    double tolerance = (dtype == at::kHalf ? 1e-3 : 8e-3) * n;
    EXPECT_NEAR(t[0].item<double>(), exact, tolerance) << c10::toString(dtype);
  }
}

TEST(Comm, ReduceScatterAndAllGather) {
  const int n = g_world->size(), r = g_world->rank();
  for (auto dtype : kDtypes)
    for (int64_t chunk : kSizes) {
      at::Tensor input = pattern(chunk * n, r, dtype);
      at::Tensor output = at::empty({chunk}, dtype);
      g_world->reduce_scatter(output, input, {ReduceOp::kSum})->wait();
      at::Tensor base = at::arange(chunk * n, at::kLong).remainder(5).to(at::kDouble).slice(0, r * chunk, (r + 1) * chunk);
      expect_equal(output, (base * n + n * (n + 1) / 2).to(dtype), "reduce_scatter " + name(dtype, chunk));

      at::Tensor mine = pattern(chunk, r, dtype);
      at::Tensor gathered = at::empty({chunk * n}, dtype);
      g_world->all_gather(gathered, mine, {})->wait();
      for (int k = 0; k < n; ++k)
        expect_equal(gathered.slice(0, k * chunk, (k + 1) * chunk), pattern(chunk, k, dtype),
                     "all_gather chunk " + std::to_string(k) + " " + name(dtype, chunk));
    }
}

TEST(Comm, BroadcastAndReduce) {
  const int n = g_world->size(), r = g_world->rank();
  for (auto dtype : kDtypes)
    for (int64_t size : kSizes) {
      int root = n - 1;
      at::Tensor t = r == root ? pattern(size, 41, dtype) : at::zeros({size}, dtype);
      g_world->broadcast(t, {root})->wait();
      expect_equal(t, pattern(size, 41, dtype), "broadcast " + name(dtype, size));

      at::Tensor s = pattern(size, r, dtype);
      g_world->reduce(s, {0, ReduceOp::kMax})->wait();
      at::Tensor base = at::arange(size, at::kLong).remainder(5).to(at::kDouble);
      expect_equal(s, r == 0 ? (base + n).to(dtype) : pattern(size, r, dtype), "reduce " + name(dtype, size));
    }
}

TEST(Comm, AllToAll) {
  const int n = g_world->size(), r = g_world->rank();
  for (auto dtype : kDtypes)
    for (int64_t chunk : {int64_t(0), int64_t(1), int64_t(5)}) {
      // Chunk j of rank r's input holds 10*r + j; after the exchange chunk k of the output holds 10*k + r.
      at::Tensor input = at::arange(n, at::kLong).mul(1).add(10 * r).repeat_interleave(chunk).to(dtype);
      at::Tensor output = at::empty_like(input);
      g_world->all_to_all(output, input, {})->wait();
      at::Tensor want = (at::arange(n, at::kLong) * 10 + r).repeat_interleave(chunk).to(dtype);
      expect_equal(output, want, "all_to_all " + name(dtype, chunk));
    }
}

// An uneven exchange (torch's all_to_all_single) where rank `from` sends rows(from, to) rows of
// width 4 to rank `to`; row k of that chunk holds 100 from + 10 to + k.
static void expect_uneven_exchange(const std::function<int64_t(int, int)>& rows, at::ScalarType dtype,
                            const std::string& what) {
  const int n = g_world->size(), r = g_world->rank();
  std::vector<int64_t> in_splits, out_splits;
  std::vector<at::Tensor> in_parts, want_parts;
  for (int j = 0; j < n; ++j) {
    in_splits.push_back(rows(r, j));
    out_splits.push_back(rows(j, r));
    in_parts.push_back((at::arange(rows(r, j), at::kLong) + 100 * r + 10 * j).unsqueeze(1).repeat({1, 4}));
    want_parts.push_back((at::arange(rows(j, r), at::kLong) + 100 * j + 10 * r).unsqueeze(1).repeat({1, 4}));
  }
  at::Tensor input = at::cat(in_parts).to(dtype), want = at::cat(want_parts).to(dtype);
  at::Tensor output = at::full({want.size(0), 4}, -1, dtype);
  AllToAllOptions opts;
  opts.input_split_sizes = in_splits;
  opts.output_split_sizes = out_splits;
  opts.site = "uneven test";
  g_world->all_to_all(output, input, opts)->wait();
  expect_equal(output, want, what);
}

// Rank r sends (r + 2j) % 3 rows to rank j, some of them none.
TEST(Comm, AllToAllUnevenSplits) {
  const int n = g_world->size();
  for (auto dtype : kDtypes)
    expect_uneven_exchange([](int from, int to) { return int64_t((from + 2 * to) % 3); }, dtype,
                           std::string("all_to_all uneven ") + c10::toString(dtype));
  // A split list that does not add up to the tensor's rows is refused before anything is sent.
  at::Tensor input = at::zeros({3, 2}), output = at::zeros({3, 2});
  AllToAllOptions bad;
  bad.input_split_sizes.assign(n, 1);
  bad.input_split_sizes[0] = 3 + n;
  bad.output_split_sizes.assign(n, 0);
  bad.output_split_sizes[0] = 3;
  try {
    g_world->all_to_all(output, input, bad);
    FAIL() << "inconsistent split sizes were accepted";
  } catch (const zeal::CommError& e) {
    EXPECT_NE(std::string(e.what()).find("input_split_sizes"), std::string::npos) << e.what();
  }
}

// Note [Caller-run collectives]: an all_to_all(v) small on one rank and large on another still
// pairs up. The rank holding it small sends its messages at once; the ranks holding it large learn
// that from its announcement and exchange messages too, instead of entering MPI_Alltoallv.
TEST(Comm, AllToAllSmallHereLargeThere) {
  const int n = g_world->size();
  if (n < 3) GTEST_SKIP() << "needs 3 ranks: two exchanging a large chunk, a third holding only small ones";
  const int64_t big = (int64_t(1) << 20) / 16 + 7;  // rows of 4 floats: over 1 MiB
  expect_uneven_exchange([&](int from, int to) { return from == 0 && to == 1 ? big : int64_t(1); }, at::kFloat,
                         "all_to_all small here, large there");
}

// Split sizes that disagree between two ranks (rank 1 sends rank 0 fewer rows, then more, than
// rank 0 expects) fail on rank 0 with an error naming rank 1 and both counts: never stale rows left
// in the output. Each round on a group of its own, which the failure breaks.
TEST(Comm, AllToAllSplitsThatDisagreeAcrossRanksRaise) {
  const int n = g_world->size(), r = g_world->rank();
  if (n < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<int> everyone(n);
  for (int i = 0; i < n; ++i) everyone[i] = i;
  for (int64_t sent : {int64_t(2), int64_t(4)}) {
    auto group = g_world->split(everyone, "disagree" + std::to_string(sent));
    std::vector<int64_t> in_splits(n, 1), out_splits(n, 1);
    if (r == 1) in_splits[0] = sent;  // what rank 1 sends rank 0
    if (r == 0) out_splits[1] = 3;    // what rank 0 expects from rank 1
    int64_t in_rows = 0, out_rows = 0;
    for (int j = 0; j < n; ++j) in_rows += in_splits[j], out_rows += out_splits[j];
    at::Tensor input = at::zeros({in_rows, 4}), output = at::zeros({out_rows, 4});
    AllToAllOptions opts;
    opts.input_split_sizes = in_splits;
    opts.output_split_sizes = out_splits;
    std::string error;
    try {
      group->all_to_all(output, input, opts)->wait();
    } catch (const CommError& e) {
      error = e.what();
    }
    if (r == 0) {
      const std::string want = sent == 2 ? "rank 1 sent 8 elements, this rank expects 12" : "rank 1 sent more than the 12";
      EXPECT_NE(error.find(want), std::string::npos) << "sent " << sent << ": " << (error.empty() ? "no error" : error);
      EXPECT_NE(error.find("split sizes disagree"), std::string::npos) << error;
    }
    g_world->barrier({})->wait();  // the world is untouched
  }
}

TEST(Comm, SendRecvRing) {
  const int n = g_world->size(), r = g_world->rank();
  if (n == 1) GTEST_SKIP() << "point-to-point needs 2 or more ranks";
  for (auto dtype : kDtypes) {
    at::Tensor out = pattern(9, r, dtype);
    at::Tensor in = at::zeros({9}, dtype);
    auto recv = g_world->recv(in, (r + n - 1) % n, {3});
    auto send = g_world->send(out, (r + 1) % n, {3});
    send->wait();
    recv->wait();
    expect_equal(in, pattern(9, (r + n - 1) % n, dtype), std::string("ring ") + c10::toString(dtype));
  }
}

TEST(Comm, AsyncWorkOverlapsAndCompletes) {
  std::vector<at::Tensor> ts;
  std::vector<WorkPtr> works;
  for (int i = 0; i < 8; ++i) {
    ts.push_back(at::full({1000}, static_cast<float>(i)));
    works.push_back(g_world->all_reduce(ts.back(), {ReduceOp::kSum}));
  }
  for (auto& w : works) w->wait();
  for (int i = 0; i < 8; ++i) {
    EXPECT_TRUE(works[i]->is_completed());
    EXPECT_EQ(works[i]->exception(), nullptr);
    EXPECT_EQ(ts[i][999].item<float>(), static_cast<float>(i * g_world->size()));
  }
  g_world->barrier({})->wait();
}

// Note [Caller-run collectives]: a small op runs on its caller only when nothing is queued or in
// progress. Submitted behind a large op, it must wait its turn: FIFO order is what keeps the
// ranks' collectives in step, and MPI allows one collective at a time on a communicator.
TEST(Comm, SmallOpWaitsBehindALargeOne) {
  const int n = g_world->size();
  const int64_t big_n = 1 << 20;  // 4 MiB, above the caller-run limit: the progress thread's
  for (int round = 0; round < 3; ++round) {
    at::Tensor big = at::ones({big_n}, at::kFloat), small = at::full({4}, 2.0f);
    WorkPtr big_work = g_world->all_reduce(big, {ReduceOp::kSum});
    g_world->all_reduce(small, {ReduceOp::kSum})->wait();
    EXPECT_TRUE(big_work->is_completed()) << "round " << round << ": the small op finished before the large one";
    big_work->wait();
    EXPECT_EQ(big[big_n - 1].item<float>(), static_cast<float>(n));
    EXPECT_EQ(small[3].item<float>(), 2.0f * n);
  }
  g_world->barrier({})->wait();
}

TEST(Comm, SubgroupsFromMesh) {
  const int n = g_world->size();
  if (n % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  zeal::parallel::Mesh topo({{"pipe", n / 2}, {"data", 2}});
  auto data = g_world->split(topo.group_of({"data"}, g_world->rank()), "data");
  EXPECT_EQ(data->size(), 2);
  at::Tensor t = at::full({3}, static_cast<float>(g_world->rank()));
  data->all_reduce(t, {ReduceOp::kSum})->wait();
  auto group = topo.group_of({"data"}, g_world->rank());
  EXPECT_EQ(t[0].item<float>(), static_cast<float>(group[0] + group[1]));
}

TEST(Comm, ProcessGroupsCutEveryProductOnce) {
  // Every group of a mesh sums the world ranks of exactly the ranks Mesh::group_of names, and
  // asking again hands back the same communicator (cut once, shared).
  const int n = g_world->size();
  const bool even = n % 2 == 0;
  zeal::parallel::Mesh mesh = even ? zeal::parallel::Mesh({{"data", n / 2}, {"tensor", 2}})
                                   : zeal::parallel::Mesh({{"data", n}});
  zeal::parallel::ProcessGroups groups(mesh, g_world);
  for (const auto& axes : std::vector<std::vector<std::string>>{{}, {"data"}, {"tensor"}, {"tensor", "data"}, {"sequence"}}) {
    const auto& group = groups.group(axes);
    EXPECT_EQ(group.get(), groups.group(axes).get());
    const std::vector<int> ranks = mesh.group_of(axes, g_world->rank());
    ASSERT_EQ(group->size(), static_cast<int>(ranks.size())) << mesh.key(axes);
    at::Tensor t = at::full({2}, static_cast<float>(g_world->rank()));
    group->all_reduce(t, {ReduceOp::kSum})->wait();
    float want = 0;
    for (int r : ranks) want += static_cast<float>(r);
    EXPECT_EQ(t[1].item<float>(), want) << mesh.key(axes);
    ASSERT_NE(groups.axes_of(group.get()), nullptr);
  }
  EXPECT_EQ(groups.group({"data", "tensor"}).get(), g_world.get());  // the product of every axis is the world
  EXPECT_EQ(groups.axes_of(nullptr), nullptr);
}

TEST(Comm, BadArgumentsRaise) {
  at::Tensor in = at::ones({5});
  at::Tensor out = at::ones({3});
  EXPECT_THROW(g_world->all_gather(out, in, {}), CommError);
  at::Tensor strided = at::ones({4, 4}).t();
  EXPECT_THROW(g_world->all_reduce(strided, {}), CommError);
  at::Tensor complex = at::ones({2}, at::kComplexFloat);
  EXPECT_THROW(g_world->all_reduce(complex, {}), CommError);
  EXPECT_THROW(g_world->broadcast(in, {g_world->size()}), CommError);
}

// Run alone (ctest comm_timeout, 3 ranks): the last rank skips one all_reduce. The others must
// fail within the timeout with an error naming the op, the group and the missing rank.
TEST(Timeout, RankThatSkipsIsNamed) {
  const int n = g_world->size(), r = g_world->rank();
  ASSERT_GE(n, 2);
  if (r == n - 1) {
    std::this_thread::sleep_for(std::chrono::seconds(4));  // skip the collective, outlive the timeout
    std::printf("TIMEOUT-SKIPPER rank %d done\n", r);
    return;
  }
  at::Tensor t = at::ones({16});
  auto start = std::chrono::steady_clock::now();
  try {
    g_world->all_reduce(t, {ReduceOp::kSum, Timeout(1500)})->wait();
    ADD_FAILURE() << "all_reduce completed without rank " << n - 1;
    std::printf("TIMEOUT-BAD rank %d: completed\n", r);
  } catch (const TimeoutError& e) {
    double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::string message = e.what();
    bool ok = message.find("all_reduce") != std::string::npos && message.find("group world") != std::string::npos &&
              message.find("did not arrive: [" + std::to_string(n - 1) + "]") != std::string::npos && waited < 10.0;
    EXPECT_TRUE(ok) << message;
    std::printf("%s rank %d after %.1fs: %s\n", ok ? "TIMEOUT-OK" : "TIMEOUT-BAD", r, waited, message.c_str());
    // The communicator is broken now: the next op fails at once instead of hanging.
    EXPECT_THROW(g_world->barrier({}), CommError);
  }
  std::fflush(stdout);
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  g_world = world(Timeout(60000));
  if (g_world->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int result = RUN_ALL_TESTS();
  std::fflush(stdout);
  // A broken communicator (the timeout test) cannot be finalized: leave without MPI_Finalize.
  bool timeout_run = ::testing::GTEST_FLAG(filter).rfind("Timeout", 0) == 0;
  if (timeout_run) std::_Exit(result);
  // Every rank agrees on the outcome, so a failure on any rank fails the job.
  at::Tensor failed = at::full({1}, result != 0 ? 1 : 0, at::kInt);
  g_world->all_reduce(failed, {ReduceOp::kMax})->wait();
  g_world.reset();
  shutdown();
  return failed.item<int>() ? 1 : result;
}
