#include "zeal/parallel/placement.h"

#include <algorithm>

#include "zeal/core/error.h"

namespace zeal::parallel {
namespace {

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

}  // namespace

const std::vector<std::string>& batch_axes() {
  static const std::vector<std::string> axes{"data", "data_inner", "expert", "ring", "sequence"};
  return axes;
}

const std::vector<std::string>& sample_axes() {
  static const std::vector<std::string> axes{"data", "data_inner", "expert"};
  return axes;
}

int samples_group_size(const Mesh& mesh) {
  int n = 1;
  for (const Mesh::Axis& a : mesh.axes())
    if (contains(sample_axes(), a.name)) n *= a.size;
  return n;
}

std::vector<std::string> reduction_axes(const Mesh& mesh, const Placement& placement) {
  for (const std::string& a : placement.split) (void)mesh.axis_size(a);  // unknown names are an error
  std::vector<std::string> out;
  for (const Mesh::Axis& a : mesh.axes())
    if (a.size > 1 && contains(batch_axes(), a.name) && !contains(placement.split, a.name)) out.push_back(a.name);
  return out;
}

int gradient_divisor(const Mesh& mesh, const Placement& placement) {
  int n = 1;
  for (const std::string& a : reduction_axes(mesh, placement)) n *= mesh.axis_size(a);
  for (const std::string& a : placement.split)
    if (contains(sample_axes(), a)) n *= mesh.axis_size(a);
  return n;
}

bool counts_in_norm(const Mesh& mesh, int rank, const Placement& placement) {
  if (!contains(placement.split, "tensor") && mesh.coord(rank, "tensor") != 0) return false;
  if (!placement.tied_stages.empty()) {
    ZEAL_CHECK(!contains(placement.split, "pipe"), "a tied parameter is held by several stages; it cannot also be "
               "split over pipe");
    return mesh.coord(rank, "pipe") == placement.tied_stages.front();
  }
  return true;
}

std::string describe(const Placement& placement) {
  std::string out;
  for (const std::string& a : placement.split) out += (out.empty() ? "split over " : ", ") + a;
  if (out.empty()) out = "replicated";
  if (!placement.tied_stages.empty()) {
    out += "; tied across stages ";
    for (size_t i = 0; i < placement.tied_stages.size(); ++i)
      out += (i ? ", " : "") + std::to_string(placement.tied_stages[i]);
  }
  return out;
}

}  // namespace zeal::parallel
