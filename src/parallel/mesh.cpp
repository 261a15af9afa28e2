#include "zeal/parallel/mesh.h"

#include <algorithm>

#include "zeal/core/error.h"

namespace zeal::parallel {

const std::vector<std::string>& axis_names() {
  static const std::vector<std::string> names{"pipe", "data", "data_inner", "expert", "ring", "sequence", "tensor"};
  return names;
}

namespace {

std::string known_list() {
  std::string out;
  for (const std::string& n : axis_names()) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

Mesh::Mesh(std::vector<Axis> axes) : axes_(std::move(axes)) {
  strides_.assign(axes_.size(), 1);
  for (int i = static_cast<int>(axes_.size()) - 1; i >= 0; --i) {
    const Axis& a = axes_[i];
    const auto& known = axis_names();
    ZEAL_CHECK(std::find(known.begin(), known.end(), a.name) != known.end(), "mesh axis '", a.name,
               "' is not one of ", known_list());
    ZEAL_CHECK(a.size >= 1, "mesh axis '", a.name, "' has size ", a.size, "; sizes must be >= 1");
    for (size_t j = i + 1; j < axes_.size(); ++j)
      ZEAL_CHECK(a.name != axes_[j].name, "mesh axis '", a.name, "' appears twice");
    strides_[i] = world_size_;
    world_size_ *= a.size;
  }
}

Mesh Mesh::with_sizes(int pipe, int data, int expert, int sequence, int tensor, int data_inner, int ring) {
  std::vector<Axis> axes;
  for (const Axis& a : std::vector<Axis>{{"pipe", pipe}, {"data", data}, {"data_inner", data_inner},
                                         {"expert", expert}, {"ring", ring}, {"sequence", sequence},
                                         {"tensor", tensor}}) {
    ZEAL_CHECK(a.size >= 1, "mesh axis '", a.name, "' has size ", a.size, "; sizes must be >= 1");
    if (a.size > 1) axes.push_back(a);
  }
  if (axes.empty()) axes.push_back({"data", 1});  // one rank: a world of one data replica
  return Mesh(std::move(axes));
}

int Mesh::index_of(const std::string& axis) const {
  for (size_t i = 0; i < axes_.size(); ++i)
    if (axes_[i].name == axis) return static_cast<int>(i);
  const auto& known = axis_names();
  ZEAL_CHECK(std::find(known.begin(), known.end(), axis) != known.end(), "mesh axis '", axis, "' is not one of ",
             known_list());
  return -1;
}

bool Mesh::has_axis(const std::string& axis) const { return index_of(axis) >= 0; }

int Mesh::axis_size(const std::string& axis) const {
  int i = index_of(axis);
  return i < 0 ? 1 : axes_[i].size;
}

int Mesh::size_of(const std::vector<std::string>& axes) const {
  int n = 1;
  for (size_t i = 0; i < axes_.size(); ++i)
    if (std::find(axes.begin(), axes.end(), axes_[i].name) != axes.end()) n *= axes_[i].size;
  for (const std::string& a : axes) (void)index_of(a);  // unknown names are an error
  return n;
}

std::vector<int> Mesh::coords(int rank) const {
  ZEAL_CHECK(rank >= 0 && rank < world_size_, "rank ", rank, " is outside a mesh of ", world_size_, " ranks");
  std::vector<int> out(axes_.size());
  for (size_t i = 0; i < axes_.size(); ++i) out[i] = (rank / strides_[i]) % axes_[i].size;
  return out;
}

int Mesh::coord(int rank, const std::string& axis) const {
  const int i = index_of(axis);
  const std::vector<int> c = coords(rank);  // checks the rank
  return i < 0 ? 0 : c[i];
}

int Mesh::rank_of(const std::vector<int>& coords) const {
  ZEAL_CHECK(coords.size() == axes_.size(), "expected ", axes_.size(), " coordinates, got ", coords.size());
  int rank = 0;
  for (size_t i = 0; i < axes_.size(); ++i) {
    ZEAL_CHECK(coords[i] >= 0 && coords[i] < axes_[i].size, "coordinate ", coords[i], " on axis '", axes_[i].name,
               "' is outside [0, ", axes_[i].size, ")");
    rank += coords[i] * strides_[i];
  }
  return rank;
}

std::vector<int> Mesh::group_of(const std::vector<std::string>& axes, int rank) const {
  std::vector<bool> free(axes_.size(), false);
  for (const std::string& a : axes)
    if (int i = index_of(a); i >= 0) free[i] = true;
  const std::vector<int> mine = coords(rank);
  // Every rank whose coordinates off `axes` are this rank's, in ascending order: odometer over the
  // free axes from the outermost, which is ascending because strides shrink inward.
  std::vector<int> c = mine;
  for (size_t i = 0; i < axes_.size(); ++i)
    if (free[i]) c[i] = 0;
  std::vector<int> out;
  while (true) {
    out.push_back(rank_of(c));
    int i = static_cast<int>(axes_.size()) - 1;
    for (; i >= 0; --i) {
      if (!free[i]) continue;
      if (++c[i] < axes_[i].size) break;
      c[i] = 0;
    }
    if (i < 0) break;
  }
  return out;
}

std::vector<std::vector<int>> Mesh::groups(const std::vector<std::string>& axes) const {
  std::vector<std::vector<int>> out;
  for (int rank = 0; rank < world_size_; ++rank) {
    std::vector<int> group = group_of(axes, rank);
    if (group.front() == rank) out.push_back(std::move(group));
  }
  return out;
}

int Mesh::group_index(const std::vector<std::string>& axes, int rank) const {
  // Groups are ordered by their first rank, which holds 0 on the group's axes and the rank's own
  // coordinates elsewhere; strides shrink inward, so that order is the mixed-radix number of the
  // coordinates on the other axes, outermost first.
  (void)group_of(axes, rank);  // validates the axis names and the rank
  const std::vector<int> c = coords(rank);
  int index = 0;
  for (size_t i = 0; i < axes_.size(); ++i)
    if (std::find(axes.begin(), axes.end(), axes_[i].name) == axes.end()) index = index * axes_[i].size + c[i];
  return index;
}

std::vector<std::string> Mesh::other_axes(const std::vector<std::string>& axes) const {
  for (const std::string& a : axes) (void)index_of(a);
  std::vector<std::string> out;
  for (const Axis& a : axes_)
    if (std::find(axes.begin(), axes.end(), a.name) == axes.end()) out.push_back(a.name);
  return out;
}

std::string Mesh::key(const std::vector<std::string>& axes) const {
  for (const std::string& a : axes) (void)index_of(a);
  std::string out;
  for (const Axis& a : axes_)
    if (a.size > 1 && std::find(axes.begin(), axes.end(), a.name) != axes.end()) out += (out.empty() ? "" : "*") + a.name;
  return out.empty() ? "self" : out;
}

std::string Mesh::describe() const {
  std::string out;
  for (const Axis& a : axes_) out += (out.empty() ? "" : " x ") + a.name + " " + std::to_string(a.size);
  return out;
}

bool Mesh::operator==(const Mesh& other) const {
  if (axes_.size() != other.axes_.size()) return false;
  for (size_t i = 0; i < axes_.size(); ++i)
    if (axes_[i].name != other.axes_[i].name || axes_[i].size != other.axes_[i].size) return false;
  return true;
}

}  // namespace zeal::parallel
