// checkpoint::slice_runs (Note [Moving between tensor-parallel sizes]): the runs that fill a
// target slice of a tensor from saved slices must give exactly the target's elements, for every
// pair of tensor-parallel sizes, split dim and element range, and read whole fragments when
// nothing moved.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "zeal/checkpoint/checkpoint.h"
#include "zeal/core/error.h"

namespace zeal::checkpoint {
namespace {

// Fills elements [begin, end) of the target slice through the runs, reading the saved slices
// cut from `full`, and compares with the slice cut directly.
void check(const at::Tensor& full, int64_t dim, int64_t saved_parts, int64_t target_parts, int64_t target_index,
           int64_t begin, int64_t end) {
  const std::vector<int64_t> shape = full.sizes().vec();
  const int64_t n = shape[dim];
  std::vector<std::pair<int64_t, int64_t>> saved;
  std::vector<at::Tensor> flat;
  for (int64_t p = 0; p < saved_parts; ++p) {
    saved.push_back({p * (n / saved_parts), n / saved_parts});
    flat.push_back(full.narrow(dim, p * (n / saved_parts), n / saved_parts).contiguous().flatten());
  }
  const int64_t size = n / target_parts, offset = target_index * size;
  at::Tensor want = full.narrow(dim, offset, size).contiguous().flatten().slice(0, begin, end);
  at::Tensor got = at::full({end - begin}, -1.0f);
  for (const SliceRun& r : slice_runs(shape, dim, offset, size, saved, begin, end))
    got.slice(0, r.local_begin, r.local_begin + r.length)
        .copy_(flat[r.piece].slice(0, r.saved_begin, r.saved_begin + r.length));
  ASSERT_TRUE(at::equal(got, want)) << "dim " << dim << " saved " << saved_parts << " target " << target_parts
                                    << "/" << target_index << " [" << begin << ", " << end << ")";
}

TEST(SliceRuns, EveryMoveBetweenSizesDimsAndRanges) {
  at::Tensor full = at::arange(4 * 8 * 6, at::kFloat).view({4, 8, 6});
  const int64_t sizes[] = {1, 2, 4};
  for (int64_t dim = 0; dim < 3; ++dim)
    for (int64_t saved : sizes)
      for (int64_t target : sizes) {
        if (full.size(dim) % saved || full.size(dim) % target) continue;
        for (int64_t index = 0; index < target; ++index) {
          const int64_t numel = full.numel() / target;
          for (auto [begin, end] : std::vector<std::pair<int64_t, int64_t>>{
                   {0, numel}, {0, 1}, {numel - 1, numel}, {5, numel / 2 + 7}, {numel / 3, numel / 3}})
            check(full, dim, saved, target, index, begin, std::min(end, numel));
        }
      }
}

TEST(SliceRuns, AnUnchangedLayoutReadsOneRunPerSlice) {
  // The same cut on both sides: each fragment is one read, not one per row.
  auto runs = slice_runs({64, 32}, 1, 16, 16, {{0, 16}, {16, 16}}, 0, 64 * 16);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].piece, 1u);
  EXPECT_EQ(runs[0].saved_begin, 0);
  EXPECT_EQ(runs[0].length, 64 * 16);
  // A whole tensor from two row slices (dim 0): two runs.
  EXPECT_EQ(slice_runs({8, 3}, 0, 0, 8, {{0, 4}, {4, 4}}, 0, 24).size(), 2u);
  // The same from two column slices (dim 1): a run per row per slice.
  EXPECT_EQ(slice_runs({8, 4}, 1, 0, 4, {{0, 2}, {2, 2}}, 0, 32).size(), 16u);
}

TEST(SliceRuns, TheFirstHoldingSliceWinsAndGapsAreErrors) {
  // A tied copy listed twice, and a whole copy first: everything from piece 0.
  for (const SliceRun& r : slice_runs({6, 2}, 0, 0, 6, {{0, 6}, {0, 3}, {3, 3}}, 0, 12)) EXPECT_EQ(r.piece, 0u);
  // Overlapping slices: rows 2..3 from the first listed.
  auto runs = slice_runs({6}, 0, 0, 6, {{2, 4}, {0, 3}}, 0, 6);
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[0].piece, 1u);
  EXPECT_EQ(runs[0].length, 2);
  EXPECT_EQ(runs[1].piece, 0u);
  EXPECT_EQ(runs[1].length, 4);
  EXPECT_THROW(slice_runs({6}, 0, 0, 6, {{0, 2}, {3, 3}}, 0, 6), CheckpointError);
}

}  // namespace
}  // namespace zeal::checkpoint
