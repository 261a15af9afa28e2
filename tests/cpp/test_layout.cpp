#include <gtest/gtest.h>

#include <numeric>
#include <set>

#include "zeal/core/error.h"
#include "zeal/zero/layout.h"
#include "zeal/zero/segments.h"

using namespace zeal::zero;

TEST(Layout, ReverseOrderBucketsPaddedToWorld) {
  // Parameters of 5, 3, 7 and 2 elements, buckets of >= 6 elements, 4 ranks.
  FlatLayout l = make_flat_layout({5, 3, 7, 2}, 6, 4);
  // Last parameter first: p3 [0,2), p2 [2,9) closes bucket 0 (9 elements, padded to 12);
  // p1 [12,15), p0 [15,20) closes bucket 1 (8 elements, already a multiple of 4).
  EXPECT_EQ(l.offsets, (std::vector<int64_t>{15, 12, 2, 0}));
  ASSERT_EQ(l.buckets.size(), 2u);
  EXPECT_EQ(l.buckets[0].begin, 0);
  EXPECT_EQ(l.buckets[0].data_end, 9);
  EXPECT_EQ(l.buckets[0].end, 12);
  EXPECT_EQ(l.buckets[0].params, (std::vector<size_t>{3, 2}));
  EXPECT_EQ(l.buckets[1].begin, 12);
  EXPECT_EQ(l.buckets[1].end, 20);
  EXPECT_EQ(l.total, 20);
}

TEST(Layout, OwnedChunksPartitionEveryBucket) {
  for (int world : {1, 2, 3, 4}) {
    FlatLayout l = make_flat_layout({10, 1, 33, 7, 4, 100, 2}, 16, world);
    std::multiset<int64_t> covered;
    int64_t shard = l.shard_size(true);
    for (int r = 0; r < world; ++r) {
      int64_t local = 0;
      for (const OwnedRange& o : l.owned(r, true)) {
        EXPECT_EQ(o.local_begin, local);
        local += o.flat_end - o.flat_begin;
        for (int64_t i = o.flat_begin; i < o.flat_end; ++i) covered.insert(i);
      }
      EXPECT_EQ(local, shard) << "every rank owns the same number of elements";
    }
    EXPECT_EQ(static_cast<int64_t>(covered.size()), l.total);
    EXPECT_EQ(static_cast<int64_t>(std::set<int64_t>(covered.begin(), covered.end()).size()), l.total);
    EXPECT_EQ(shard * world, l.total);
    for (const Bucket& b : l.buckets) EXPECT_EQ((b.end - b.begin) % world, 0);
  }
}

TEST(Layout, ParametersNeverStraddleBuckets) {
  FlatLayout l = make_flat_layout({50, 50, 50}, 60, 3);
  for (const Bucket& b : l.buckets)
    for (size_t p : b.params) {
      EXPECT_GE(l.offsets[p], b.begin);
      EXPECT_LE(l.offsets[p] + l.numels[p], b.data_end);
    }
}

TEST(Layout, ToLocalIntersects) {
  std::vector<OwnedRange> owned = {{0, 4, 0}, {12, 14, 4}};
  auto local = to_local(owned, 2, 13);
  ASSERT_EQ(local.size(), 2u);
  EXPECT_EQ(local[0].local_begin, 2);
  EXPECT_EQ(local[0].local_end, 4);
  EXPECT_EQ(local[1].local_begin, 4);
  EXPECT_EQ(local[1].local_end, 5);
  EXPECT_TRUE(to_local(owned, 5, 11).empty());
}

TEST(Layout, RejectsBadInput) {
  EXPECT_THROW(make_flat_layout({1}, 0, 2), zeal::Error);
  EXPECT_THROW(make_flat_layout({1}, 4, 0), zeal::Error);
  EXPECT_THROW(make_flat_layout({1}, 4, 2).owned(2, true), zeal::Error);
}

// Every element of every parameter belongs to exactly one rank's fragment, at the local offset
// where that rank's shard holds it; padding belongs to nobody.
TEST(Layout, FragmentsTileEveryParameterOnce) {
  for (int world : {1, 2, 3, 4}) {
    for (int64_t bucket : {1, 7, 1000}) {
      FlatLayout l = make_flat_layout({5, 0, 13, 2, 9}, bucket, world);
      std::vector<std::vector<int>> owner(l.numels.size());
      for (size_t p = 0; p < l.numels.size(); ++p) owner[p].assign(l.numels[p], 0);
      for (int r = 0; r < world; ++r) {
        auto owned = l.owned(r, true);
        for (const Fragment& f : fragments(l, owned)) {
          ASSERT_LT(f.begin, f.end);
          for (int64_t e = f.begin; e < f.end; ++e) ++owner[f.param][e];
          // The local offset maps back to the flat element of the same parameter element.
          auto local = to_local(owned, l.offsets[f.param] + f.begin, l.offsets[f.param] + f.end);
          ASSERT_FALSE(local.empty());
          EXPECT_EQ(local.front().local_begin, f.local);
        }
      }
      for (const auto& counts : owner)
        for (int c : counts) EXPECT_EQ(c, 1) << "world " << world << " bucket " << bucket;
    }
  }
}

TEST(Layout, OwnedPiecesCarryBothCoordinates) {
  // Two owned ranges: flat [4, 8) at local 0 and flat [20, 26) at local 4.
  std::vector<zeal::zero::OwnedRange> owned(2);
  owned[0].flat_begin = 4, owned[0].flat_end = 8, owned[0].local_begin = 0;
  owned[1].flat_begin = 20, owned[1].flat_end = 26, owned[1].local_begin = 4;
  auto by_flat = zeal::zero::owned_pieces_flat(owned, 6, 22);
  ASSERT_EQ(by_flat.size(), 2u);
  EXPECT_EQ(by_flat[0].flat_begin, 6);
  EXPECT_EQ(by_flat[0].local_begin, 2);
  EXPECT_EQ(by_flat[0].size, 2);
  EXPECT_EQ(by_flat[1].flat_begin, 20);
  EXPECT_EQ(by_flat[1].local_begin, 4);
  EXPECT_EQ(by_flat[1].size, 2);
  auto by_local = zeal::zero::owned_pieces_local(owned, 3, 7);
  ASSERT_EQ(by_local.size(), 2u);
  EXPECT_EQ(by_local[0].flat_begin, 7);
  EXPECT_EQ(by_local[0].local_begin, 3);
  EXPECT_EQ(by_local[0].size, 1);
  EXPECT_EQ(by_local[1].flat_begin, 20);
  EXPECT_EQ(by_local[1].local_begin, 4);
  EXPECT_EQ(by_local[1].size, 3);
  EXPECT_TRUE(zeal::zero::owned_pieces_local(owned, 10, 12).empty());
}

TEST(Segments, CoverEveryOwnedElementOnceWithItsGroup) {
  // Seven parameters in two groups (0-3 and 4-6), every world size, stage 0 and partitioned,
  // contiguous and per-tensor segments, with and without the flat-coordinate ones.
  const std::vector<int64_t> numels{10, 1, 33, 7, 4, 100, 2};
  const std::vector<size_t> group_of{0, 0, 0, 0, 1, 1, 1};
  std::vector<zeal::optim::ParamGroup> groups(2);
  groups[0].lr = 0.1;
  groups[1].lr = 0.2;
  for (int world : {1, 2, 3, 4})
    for (bool partitioned : {false, true})
      for (bool per_tensor : {false, true})
        for (bool flat_state : {false, true}) {
          FlatLayout l = make_flat_layout(numels, 16, world);
          for (int rank = 0; rank < world; ++rank) {
            const std::vector<OwnedRange> owned = l.owned(rank, partitioned);
            SegmentSpec spec{&l, &owned, groups, group_of, per_tensor, flat_state};
            Segments s = build_segments(spec);
            ASSERT_EQ(s.local.size(), s.group_of.size());
            // Which parameter each local element holds (-1: padding).
            std::vector<int64_t> param_at(l.shard_size(partitioned), -1);
            for (const OwnedRange& o : owned)
              for (int64_t f = o.flat_begin; f < o.flat_end; ++f)
                for (size_t i = 0; i < numels.size(); ++i)
                  if (f >= l.offsets[i] && f < l.offsets[i] + numels[i]) param_at[o.local_begin + f - o.flat_begin] = i;
            std::vector<int> hits(param_at.size(), 0);
            for (size_t k = 0; k < s.local.size(); ++k) {
              const auto& seg = s.local[k];
              ASSERT_GE(seg.begin, 0);
              ASSERT_LE(seg.end, static_cast<int64_t>(param_at.size()));
              EXPECT_EQ(seg.lr, groups[s.group_of[k]].lr);
              for (int64_t e = seg.begin; e < seg.end; ++e) {
                ++hits[e];
                if (param_at[e] >= 0) EXPECT_EQ(group_of[param_at[e]], s.group_of[k]);
                if (per_tensor) EXPECT_EQ(seg.tensor, param_at[e]);
              }
            }
            for (size_t e = 0; e < param_at.size(); ++e)
              if (param_at[e] >= 0) EXPECT_EQ(hits[e], 1) << "world " << world << " rank " << rank << " element " << e;
            for (int h : hits) EXPECT_LE(h, 1);
            if (!flat_state) {
              EXPECT_TRUE(s.flat.empty());
              continue;
            }
            // The flat segments tile each group's (or parameter's) flat range, owned pieces mapped.
            std::vector<int> flat_hits(l.total, 0);
            for (size_t k = 0; k < s.flat.size(); ++k) {
              const auto& seg = s.flat[k];
              for (int64_t f = seg.flat_begin; f < seg.flat_end; ++f) ++flat_hits[f];
              if (seg.end > seg.begin) {
                EXPECT_EQ(seg.end - seg.begin, seg.flat_end - seg.flat_begin);
                for (int64_t f = seg.flat_begin; f < seg.flat_end; ++f) {
                  bool mapped = false;
                  for (const OwnedRange& o : owned)
                    if (f >= o.flat_begin && f < o.flat_end) mapped = o.local_begin + f - o.flat_begin == seg.begin + f - seg.flat_begin;
                  EXPECT_TRUE(mapped);
                }
              }
            }
            for (size_t i = 0; i < numels.size(); ++i)
              for (int64_t f = l.offsets[i]; f < l.offsets[i] + numels[i]; ++f) EXPECT_EQ(flat_hits[f], 1);
          }
        }
}
