// The device mesh: every parallel axis of a job on one grid of ranks. Pure data and functions —
// no communicator, no globals — so the rank lists are unit-tested without MPI (tests/cpp/test_mesh.cpp);
// parallel/process_groups.h cuts the communicators from it.
//
// Axes, outermost first, the last varying fastest (consecutive ranks differ in the last axis):
//   pipe        pipeline stages
//   data        data-parallel replicas (with MoE: the expert-data replicas of one expert)
//   data_inner  the inner part of the data axis: ZeRO++'s secondary (hpZ) partition, within a node
//   expert      expert parallelism: ranks holding different experts, splitting the data among them
//   ring        the ring axis of sequence parallelism: groups of sequence ranks that pass keys and
//               values around a ring (ring attention), each group all-to-all inside (hierarchical)
//   sequence    sequence parallelism (Ulysses): ranks holding parts of one sequence
//   tensor      tensor (Megatron) parallelism: ranks holding slices of the same weights
// An axis the mesh does not hold has size 1: asking for its group gives the rank alone, so callers
// need not ask first. A group can span several axes: the product data x expert x ring x sequence is the
// set of ranks that see different tokens of the same dense weights (their gradients are summed).
//
// Note [Mesh order]: DeepSpeed's layouts, which the defaults follow so that a rank means the same
// thing in both systems: tensor ranks are consecutive (they talk the most), then sequence ranks
// (DeepSpeed's sequence groups are consecutive ranks), then the ring across those groups, then
// expert ranks (DeepSpeed cuts an expert
// group from consecutive ranks of a data group), then data, with pipeline stages outermost
// (DeepSpeed's PipeDataParallelTopology / PipeModelDataParallelTopology).
#pragma once

#include <string>
#include <vector>

namespace zeal::parallel {

// The axis names, in the default order (outermost first).
const std::vector<std::string>& axis_names();

class Mesh {
 public:
  struct Axis {
    std::string name;
    int size = 1;
  };

  // axes: outermost first; names from axis_names(), each at most once, sizes >= 1.
  explicit Mesh(std::vector<Axis> axes);
  // The default order (Note [Mesh order]) with these sizes; axes of size 1 are left out.
  static Mesh with_sizes(int pipe, int data, int expert = 1, int sequence = 1, int tensor = 1, int data_inner = 1,
                         int ring = 1);

  int world_size() const { return world_size_; }
  const std::vector<Axis>& axes() const { return axes_; }
  bool has_axis(const std::string& axis) const;
  int axis_size(const std::string& axis) const;  // 1 for a known axis the mesh does not hold
  int size_of(const std::vector<std::string>& axes) const;  // the product of their sizes

  std::vector<int> coords(int rank) const;            // one per axis of axes()
  int coord(int rank, const std::string& axis) const;  // 0 on an axis the mesh does not hold
  int rank_of(const std::vector<int>& coords) const;   // inverse of coords()

  // The ranks that share every coordinate except those on `axes` with `rank`, ascending (which is
  // the order of their coordinates on `axes`, outermost first): the group over those axes holding
  // `rank`. Axes may come in any order; an axis named twice counts once.
  std::vector<int> group_of(const std::vector<std::string>& axes, int rank) const;
  // Every such group, ordered by first rank; together they partition the world.
  std::vector<std::vector<int>> groups(const std::vector<std::string>& axes) const;
  int group_index(const std::vector<std::string>& axes, int rank) const;  // among groups(axes)
  // Every axis of the mesh except `axes` (in mesh order): the complement, e.g. of "data" the
  // ranks that hold the other parts of one model replica.
  std::vector<std::string> other_axes(const std::vector<std::string>& axes) const;
  // "data", "data*sequence", "tensor" ... in mesh order, axes of size 1 left out ("self" if none):
  // a group's name in messages, and the key ProcessGroups caches communicators under.
  std::string key(const std::vector<std::string>& axes) const;

  std::string describe() const;  // "pipe 2 x data 2 x tensor 2"
  bool operator==(const Mesh& other) const;

 private:
  int index_of(const std::string& axis) const;  // -1 when absent; throws for an unknown name

  std::vector<Axis> axes_;
  std::vector<int> strides_;
  int world_size_ = 1;
};

}  // namespace zeal::parallel
