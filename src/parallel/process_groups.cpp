#include "zeal/parallel/process_groups.h"

#include "zeal/comm/world.h"
#include "zeal/core/error.h"

namespace zeal::parallel {

ProcessGroups::ProcessGroups(Mesh mesh, comm::CommunicatorPtr world) : mesh_(std::move(mesh)), world_(std::move(world)) {
  ZEAL_CHECK(world_, "ProcessGroups needs a world communicator");
  ZEAL_CHECK(world_->size() == mesh_.world_size(), "the mesh ", mesh_.describe(), " holds ", mesh_.world_size(),
             " ranks, but the world has ", world_->size());
  // Note [Cutting groups]: every product of the axes of size > 1, in one fixed order.
  std::vector<std::string> axes;
  for (const Mesh::Axis& a : mesh_.axes())
    if (a.size > 1) axes.push_back(a.name);
  const size_t k = axes.size();
  for (size_t bits = 0; bits < (size_t{1} << k); ++bits) {
    Cut cut;
    for (size_t i = 0; i < k; ++i)
      if (bits & (size_t{1} << i)) cut.axes.push_back(axes[i]);
    const std::string key = mesh_.key(cut.axes);
    if (cut.axes.size() == k) {
      cut.host = world_;  // the product of every axis is the world itself
    } else {
      const std::vector<int> ranks = mesh_.group_of(cut.axes, rank());
      cut.host = world_->split(ranks, key + "[" + std::to_string(mesh_.group_index(cut.axes, rank())) + "]");
    }
    cuts_.emplace(key, std::move(cut));
  }
}

const comm::CommunicatorPtr& ProcessGroups::group(const std::vector<std::string>& axes) const {
  auto it = cuts_.find(mesh_.key(axes));
  ZEAL_INTERNAL_ASSERT(it != cuts_.end(), "no group was cut for ", mesh_.key(axes));
  return it->second.host;
}

comm::CommunicatorPtr ProcessGroups::group_on(const std::vector<std::string>& axes, const c10::Device& device) {
  Cut& cut = cuts_.at(mesh_.key(axes));
  if (!device.is_cuda()) return cut.host;
  comm::CommunicatorPtr& twin = cut.on_device[device.str()];
  if (!twin) twin = comm::for_device(cut.host, device);
  return twin;
}

const std::vector<std::string>* ProcessGroups::axes_of(const comm::Communicator* group) const {
  for (const auto& [key, cut] : cuts_) {
    if (cut.host.get() == group) return &cut.axes;
    for (const auto& [device, twin] : cut.on_device)
      if (twin.get() == group) return &cut.axes;
  }
  return nullptr;
}

const comm::CommunicatorPtr& ProcessGroups::custom(const std::string& key, const std::vector<int>& ranks) {
  auto it = custom_.find(key);
  if (it != custom_.end()) return it->second;
  return custom_[key] = world_->split(ranks, key);
}

}  // namespace zeal::parallel
