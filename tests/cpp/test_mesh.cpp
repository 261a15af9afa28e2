// parallel::Mesh as pure data: rank lists for every axis and product of axes, in every order and
// size, against a brute-force definition (ranks whose coordinates agree off the chosen axes).
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "zeal/core/error.h"
#include "zeal/parallel/mesh.h"
#include "zeal/parallel/placement.h"

using zeal::parallel::Mesh;

namespace {

// The definition, by brute force over coordinates.
std::vector<int> brute_group(const Mesh& m, const std::vector<std::string>& axes, int rank) {
  std::vector<int> out;
  const std::vector<int> mine = m.coords(rank);
  for (int r = 0; r < m.world_size(); ++r) {
    const std::vector<int> c = m.coords(r);
    bool same = true;
    for (size_t i = 0; i < c.size(); ++i) {
      const bool free = std::find(axes.begin(), axes.end(), m.axes()[i].name) != axes.end();
      if (!free && c[i] != mine[i]) same = false;
    }
    if (same) out.push_back(r);
  }
  return out;
}

// Every subset of `names`.
std::vector<std::vector<std::string>> subsets(const std::vector<std::string>& names) {
  std::vector<std::vector<std::string>> out;
  for (size_t bits = 0; bits < (size_t{1} << names.size()); ++bits) {
    std::vector<std::string> s;
    for (size_t i = 0; i < names.size(); ++i)
      if (bits & (size_t{1} << i)) s.push_back(names[i]);
    out.push_back(s);
  }
  return out;
}

}  // namespace

TEST(Mesh, CoordsRoundTripAndLastAxisFastest) {
  Mesh t({{"pipe", 2}, {"data", 3}, {"tensor", 2}});
  EXPECT_EQ(t.world_size(), 12);
  for (int r = 0; r < 12; ++r) EXPECT_EQ(t.rank_of(t.coords(r)), r);
  EXPECT_EQ(t.coords(1), (std::vector<int>{0, 0, 1}));
  EXPECT_EQ(t.coords(2), (std::vector<int>{0, 1, 0}));
  EXPECT_EQ(t.coords(6), (std::vector<int>{1, 0, 0}));
  EXPECT_EQ(t.coord(7, "tensor"), 1);
  EXPECT_EQ(t.coord(7, "sequence"), 0);  // an axis the mesh does not hold: size 1, coordinate 0
  EXPECT_EQ(t.axis_size("sequence"), 1);
}

TEST(Mesh, GroupsPartitionTheWorld) {
  Mesh t({{"pipe", 2}, {"data", 3}, {"tensor", 2}});
  EXPECT_EQ(t.groups({"tensor"}), (std::vector<std::vector<int>>{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}}));
  EXPECT_EQ(t.groups({"data"}), (std::vector<std::vector<int>>{{0, 2, 4}, {1, 3, 5}, {6, 8, 10}, {7, 9, 11}}));
  EXPECT_EQ(t.groups({"pipe"}), (std::vector<std::vector<int>>{{0, 6}, {1, 7}, {2, 8}, {3, 9}, {4, 10}, {5, 11}}));
  for (const char* axis : {"pipe", "data", "tensor"}) {
    std::multiset<int> seen;
    for (auto& g : t.groups({axis})) seen.insert(g.begin(), g.end());
    EXPECT_EQ(seen.size(), 12u);
    EXPECT_EQ(std::set<int>(seen.begin(), seen.end()).size(), 12u) << axis;
  }
  EXPECT_EQ(t.group_of({"data"}, 9), (std::vector<int>{7, 9, 11}));
  EXPECT_EQ(t.group_index({"data"}, 9), 3);
  // Products: data x tensor is a pipeline stage's ranks; the complement of data is one replica.
  EXPECT_EQ(t.group_of({"tensor", "data"}, 9), (std::vector<int>{6, 7, 8, 9, 10, 11}));
  EXPECT_EQ(t.other_axes({"data"}), (std::vector<std::string>{"pipe", "tensor"}));
  EXPECT_EQ(t.group_of(t.other_axes({"data"}), 9), (std::vector<int>{2, 3, 8, 9}));
  EXPECT_EQ(t.key({"tensor", "pipe", "sequence"}), "pipe*tensor");
  EXPECT_EQ(t.key({}), "self");
  EXPECT_EQ(t.group_of({}, 5), (std::vector<int>{5}));
  EXPECT_EQ(t.group_of({"pipe", "data", "tensor"}, 5).size(), 12u);
}

TEST(Mesh, EveryOrderSizeAndProductMatchesTheDefinition) {
  // Three axes drawn from the six, in every order, each of size 1..8 (world <= 64), every product.
  const std::vector<std::string>& all = zeal::parallel::axis_names();
  int meshes = 0;
  for (size_t a = 0; a < all.size(); ++a)
    for (size_t b = 0; b < all.size(); ++b)
      for (size_t c = 0; c < all.size(); ++c) {
        if (a == b || b == c || a == c) continue;
        for (int sa : {1, 2, 3}) for (int sb : {1, 4}) for (int sc : {2, 5, 8}) {
          if (sa * sb * sc > 64) continue;
          Mesh m({{all[a], sa}, {all[b], sb}, {all[c], sc}});
          ++meshes;
          for (const auto& axes : subsets({all[a], all[b], all[c], "sequence"})) {
            std::multiset<int> seen;
            for (const auto& g : m.groups(axes)) {
              EXPECT_EQ(static_cast<int>(g.size()), m.size_of(axes));
              seen.insert(g.begin(), g.end());
            }
            EXPECT_EQ(static_cast<int>(std::set<int>(seen.begin(), seen.end()).size()), m.world_size());
            EXPECT_EQ(static_cast<int>(seen.size()), m.world_size());
            for (int r = 0; r < m.world_size(); ++r) {
              ASSERT_EQ(m.group_of(axes, r), brute_group(m, axes, r)) << m.describe() << " " << m.key(axes);
              EXPECT_EQ(m.groups(axes)[m.group_index(axes, r)], m.group_of(axes, r));
            }
          }
        }
      }
  EXPECT_GT(meshes, 1000);
}

TEST(Mesh, SizesOneToEightOnOneAxis) {
  for (int n = 1; n <= 8; ++n) {
    Mesh m({{"data", n}});
    std::vector<int> all(n);
    for (int r = 0; r < n; ++r) all[r] = r;
    EXPECT_EQ(m.groups({"data"}), (std::vector<std::vector<int>>{all}));
    EXPECT_EQ(m.groups({"tensor"}).size(), static_cast<size_t>(n));
  }
}

TEST(Mesh, DefaultOrderFollowsDeepSpeed) {
  // Note [Mesh order]: tensor innermost, then sequence, expert, data, pipe outermost.
  Mesh m = Mesh::with_sizes(/*pipe=*/2, /*data=*/2, /*expert=*/1, /*sequence=*/1, /*tensor=*/2);
  EXPECT_EQ(m.describe(), "pipe 2 x data 2 x tensor 2");
  EXPECT_EQ(m.group_of({"tensor"}, 0), (std::vector<int>{0, 1}));
  Mesh s = Mesh::with_sizes(1, 2, 1, /*sequence=*/2);
  EXPECT_EQ(s.group_of({"sequence"}, 2), (std::vector<int>{2, 3}));  // consecutive ranks
  EXPECT_EQ(s.group_of({"data", "sequence"}, 2), (std::vector<int>{0, 1, 2, 3}));
  Mesh e = Mesh::with_sizes(1, 2, /*expert=*/4);
  EXPECT_EQ(e.group_of({"expert"}, 5), (std::vector<int>{4, 5, 6, 7}));  // expert-parallel group
  EXPECT_EQ(e.group_of({"data"}, 5), (std::vector<int>{1, 5}));         // expert-data group
  EXPECT_EQ(Mesh::with_sizes(1, 1).world_size(), 1);
  EXPECT_TRUE(Mesh::with_sizes(1, 4) == Mesh({{"data", 4}}));
  // Hierarchical sequence parallelism: all-to-all inside consecutive pairs, the ring across them.
  Mesh h = Mesh::with_sizes(1, 2, 1, /*sequence=*/2, 1, 1, /*ring=*/2);
  EXPECT_EQ(h.describe(), "data 2 x ring 2 x sequence 2");
  EXPECT_EQ(h.group_of({"sequence"}, 5), (std::vector<int>{4, 5}));
  EXPECT_EQ(h.group_of({"ring"}, 5), (std::vector<int>{5, 7}));
  EXPECT_EQ(h.group_of({"ring", "sequence"}, 5), (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(zeal::parallel::reduction_axes(h, {}), (std::vector<std::string>{"data", "ring", "sequence"}));
  EXPECT_EQ(zeal::parallel::samples_group_size(h), 2);  // ring and sequence ranks share samples
}

TEST(Mesh, RejectsBadInput) {
  EXPECT_THROW(Mesh({{"data", 0}}), zeal::Error);
  EXPECT_THROW(Mesh({{"data", 2}, {"data", 2}}), zeal::Error);
  EXPECT_THROW(Mesh({{"model", 2}}), zeal::Error);  // not an axis name
  Mesh t({{"data", 2}});
  EXPECT_THROW(t.groups({"tensr"}), zeal::Error);
  EXPECT_THROW(t.coords(2), zeal::Error);
  EXPECT_THROW(t.coord(-1, "tensor"), zeal::Error);
  EXPECT_THROW(Mesh::with_sizes(1, 0), zeal::Error);
}

TEST(Placement, ReductionGroupAndNormCounting) {
  using zeal::parallel::Placement;
  using zeal::parallel::counts_in_norm;
  using zeal::parallel::reduction_axes;
  Mesh m({{"pipe", 2}, {"data", 2}, {"sequence", 2}, {"tensor", 2}});
  const Placement dense{};                       // a LayerNorm: replicated everywhere but its stage
  const Placement sliced{{"tensor"}, {}};        // a column-parallel weight
  const Placement per_sequence{{"sequence"}, {}};  // replicated over data only (a hand-built group)
  const Placement tied{{}, {0, 1}};              // an embedding tied across both stages
  EXPECT_EQ(reduction_axes(m, dense), (std::vector<std::string>{"data", "sequence"}));
  EXPECT_EQ(reduction_axes(m, sliced), (std::vector<std::string>{"data", "sequence"}));
  EXPECT_EQ(reduction_axes(m, per_sequence), (std::vector<std::string>{"data"}));
  EXPECT_EQ(reduction_axes(Mesh({{"tensor", 2}}), dense), (std::vector<std::string>{}));
  int dense_counters = 0, sliced_counters = 0, tied_counters = 0;
  for (int r = 0; r < m.world_size(); ++r) {
    dense_counters += counts_in_norm(m, r, dense);
    sliced_counters += counts_in_norm(m, r, sliced);
    tied_counters += counts_in_norm(m, r, tied);
    EXPECT_EQ(counts_in_norm(m, r, dense), m.coord(r, "tensor") == 0);
    EXPECT_EQ(counts_in_norm(m, r, tied), m.coord(r, "tensor") == 0 && m.coord(r, "pipe") == 0);
  }
  // Per (data, sequence) position: a replicated value once per stage, a slice on every tensor rank,
  // a tied value once in the whole pipeline.
  EXPECT_EQ(dense_counters, 16 / 2);
  EXPECT_EQ(sliced_counters, 16);
  EXPECT_EQ(tied_counters, 16 / 4);
  EXPECT_THROW(reduction_axes(m, Placement{{"model"}, {}}), zeal::Error);
}

TEST(Placement, SamplesPerStepCountOnlyTheAxesThatSeeDifferentSamples) {
  // Note [Samples per step]: data, data_inner and expert ranks see different samples; sequence,
  // tensor and pipe ranks share theirs.
  using zeal::parallel::samples_group_size;
  EXPECT_EQ(samples_group_size(Mesh({{"data", 4}})), 4);
  EXPECT_EQ(samples_group_size(Mesh({{"pipe", 2}, {"data", 2}, {"sequence", 2}, {"tensor", 2}})), 2);
  EXPECT_EQ(samples_group_size(Mesh({{"data", 2}, {"data_inner", 2}, {"expert", 2}, {"sequence", 3}})), 8);
  EXPECT_EQ(samples_group_size(Mesh({{"tensor", 8}})), 1);
}
