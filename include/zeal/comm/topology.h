// The topology grid: ranks laid out on named axes ("pipeline", "data", "tensor"), outermost
// first, the last axis varying fastest. Pure data and functions: no communicator, no globals.
// Communicators for an axis are cut from the world with Communicator::split(group_of(...)).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace zeal::comm {

class Topology {
 public:
  // axes: (name, size) pairs, outermost first. Sizes must be >= 1; names must be distinct.
  explicit Topology(std::vector<std::pair<std::string, int>> axes);

  int world_size() const { return world_size_; }
  int num_axes() const { return static_cast<int>(axes_.size()); }
  int axis_size(const std::string& axis) const;

  std::vector<int> coords(int rank) const;          // one coordinate per axis
  int rank_of(const std::vector<int>& coords) const;  // inverse of coords()

  // Every group along `axis`: ranks that share all other coordinates, ordered by their
  // coordinate on `axis`. Together the groups partition the world.
  std::vector<std::vector<int>> groups(const std::string& axis) const;
  // The group along `axis` that holds `rank`, and the group's index among groups(axis).
  std::vector<int> group_of(const std::string& axis, int rank) const;
  int group_index(const std::string& axis, int rank) const;

 private:
  int axis_index(const std::string& axis) const;

  std::vector<std::pair<std::string, int>> axes_;
  std::vector<int> strides_;
  int world_size_ = 1;
};

}  // namespace zeal::comm
