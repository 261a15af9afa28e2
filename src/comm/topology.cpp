#include "zeal/comm/topology.h"

#include <algorithm>

#include "zeal/core/error.h"

namespace zeal::comm {

Topology::Topology(std::vector<std::pair<std::string, int>> axes) : axes_(std::move(axes)) {
  ZEAL_CHECK(!axes_.empty(), "a topology needs at least one axis");
  strides_.assign(axes_.size(), 1);
  for (int i = static_cast<int>(axes_.size()) - 1; i >= 0; --i) {
    ZEAL_CHECK(axes_[i].second >= 1, "topology axis '", axes_[i].first, "' has size ", axes_[i].second,
               "; sizes must be >= 1");
    for (size_t j = i + 1; j < axes_.size(); ++j)
      ZEAL_CHECK(axes_[i].first != axes_[j].first, "topology axis '", axes_[i].first, "' appears twice");
    strides_[i] = world_size_;
    world_size_ *= axes_[i].second;
  }
}

int Topology::axis_index(const std::string& axis) const {
  for (size_t i = 0; i < axes_.size(); ++i)
    if (axes_[i].first == axis) return static_cast<int>(i);
  std::string names;
  for (const auto& a : axes_) names += (names.empty() ? "" : ", ") + a.first;
  throw Error("topology has no axis '" + axis + "' (axes: " + names + ")");
}

int Topology::axis_size(const std::string& axis) const { return axes_[axis_index(axis)].second; }

std::vector<int> Topology::coords(int rank) const {
  ZEAL_CHECK(rank >= 0 && rank < world_size_, "rank ", rank, " is outside a topology of ", world_size_, " ranks");
  std::vector<int> out(axes_.size());
  for (size_t i = 0; i < axes_.size(); ++i) out[i] = (rank / strides_[i]) % axes_[i].second;
  return out;
}

int Topology::rank_of(const std::vector<int>& coords) const {
  ZEAL_CHECK(coords.size() == axes_.size(), "expected ", axes_.size(), " coordinates, got ", coords.size());
  int rank = 0;
  for (size_t i = 0; i < axes_.size(); ++i) {
    ZEAL_CHECK(coords[i] >= 0 && coords[i] < axes_[i].second, "coordinate ", coords[i], " on axis '",
               axes_[i].first, "' is outside [0, ", axes_[i].second, ")");
    rank += coords[i] * strides_[i];
  }
  return rank;
}

std::vector<int> Topology::group_of(const std::string& axis, int rank) const {
  int a = axis_index(axis);
  std::vector<int> c = coords(rank);
  std::vector<int> group;
  for (int k = 0; k < axes_[a].second; ++k) {
    c[a] = k;
    group.push_back(rank_of(c));
  }
  return group;
}

std::vector<std::vector<int>> Topology::groups(const std::string& axis) const {
  std::vector<std::vector<int>> out;
  for (int rank = 0; rank < world_size_; ++rank) {
    std::vector<int> group = group_of(axis, rank);
    if (group.front() == rank) out.push_back(std::move(group));
  }
  return out;
}

int Topology::group_index(const std::string& axis, int rank) const {
  int first = group_of(axis, rank).front();
  auto all = groups(axis);
  for (size_t i = 0; i < all.size(); ++i)
    if (all[i].front() == first) return static_cast<int>(i);
  ZEAL_INTERNAL_ASSERT(false, "rank ", rank, " is in no group of axis ", axis);
  return -1;
}

}  // namespace zeal::comm
