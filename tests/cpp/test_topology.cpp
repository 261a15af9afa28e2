#include <gtest/gtest.h>

#include <set>

#include "zeal/comm/topology.h"
#include "zeal/core/error.h"

using zeal::comm::Topology;

TEST(Topology, CoordsRoundTripAndLastAxisFastest) {
  Topology t({{"pipeline", 2}, {"data", 3}, {"tensor", 2}});
  EXPECT_EQ(t.world_size(), 12);
  for (int r = 0; r < 12; ++r) EXPECT_EQ(t.rank_of(t.coords(r)), r);
  EXPECT_EQ(t.coords(1), (std::vector<int>{0, 0, 1}));
  EXPECT_EQ(t.coords(2), (std::vector<int>{0, 1, 0}));
  EXPECT_EQ(t.coords(6), (std::vector<int>{1, 0, 0}));
}

TEST(Topology, GroupsPartitionTheWorld) {
  Topology t({{"pipeline", 2}, {"data", 3}, {"tensor", 2}});
  EXPECT_EQ(t.groups("tensor"), (std::vector<std::vector<int>>{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}}));
  EXPECT_EQ(t.groups("data"), (std::vector<std::vector<int>>{{0, 2, 4}, {1, 3, 5}, {6, 8, 10}, {7, 9, 11}}));
  EXPECT_EQ(t.groups("pipeline"),
            (std::vector<std::vector<int>>{{0, 6}, {1, 7}, {2, 8}, {3, 9}, {4, 10}, {5, 11}}));
  for (const char* axis : {"pipeline", "data", "tensor"}) {
    std::multiset<int> seen;
    for (auto& g : t.groups(axis)) seen.insert(g.begin(), g.end());
    EXPECT_EQ(seen.size(), 12u);
    EXPECT_EQ(std::set<int>(seen.begin(), seen.end()).size(), 12u) << axis;
  }
  EXPECT_EQ(t.group_of("data", 9), (std::vector<int>{7, 9, 11}));
  EXPECT_EQ(t.group_index("data", 9), 3);
}

TEST(Topology, DataOnly) {
  Topology t({{"data", 4}});
  EXPECT_EQ(t.groups("data"), (std::vector<std::vector<int>>{{0, 1, 2, 3}}));
}

TEST(Topology, RejectsBadInput) {
  EXPECT_THROW(Topology({{"data", 0}}), zeal::Error);
  EXPECT_THROW(Topology({{"data", 2}, {"data", 2}}), zeal::Error);
  Topology t({{"data", 2}});
  EXPECT_THROW(t.groups("tensor"), zeal::Error);
  EXPECT_THROW(t.coords(2), zeal::Error);
}
