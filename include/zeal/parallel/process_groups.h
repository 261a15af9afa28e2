// The communicators of one mesh (parallel/mesh.h), cut once and shared: the engine, the pipeline
// executor, the tensor-parallel layers, zero.Init and the checkpoint code all ask this object for
// their groups, so no part of Zeal cuts a grid of its own.
//
// Note [Cutting groups]: Communicator::split is collective over the world, and every rank must
// make the same splits in the same order. So the groups over every product of the mesh's axes
// (2^k of them for k axes of size > 1; at most 16 in any layout Zeal builds) are cut in one pass
// when the object is made, in a fixed order, and group() only looks them up. Custom groups (the
// ranks sharing a tied pipeline weight) are cut by custom(), which every rank calls in the same
// order, each with the group it belongs to. Device (NCCL) twins of a group are made on first use
// by group_on(): collective over that group's ranks only, which all reach it through the same
// engine construction.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "zeal/comm/communicator.h"
#include "zeal/parallel/mesh.h"

namespace zeal::parallel {

class ProcessGroups {
 public:
  // world: the ranks of the mesh, world->size() == mesh.world_size(). Collective over world.
  ProcessGroups(Mesh mesh, comm::CommunicatorPtr world);

  const Mesh& mesh() const { return mesh_; }
  int rank() const { return world_->rank(); }
  const comm::CommunicatorPtr& world() const { return world_; }
  std::vector<int> coords() const { return mesh_.coords(rank()); }
  int coord(const std::string& axis) const { return mesh_.coord(rank(), axis); }

  // The host communicator over `axes` (any order; size-1 axes ignored) holding this rank.
  const comm::CommunicatorPtr& group(const std::vector<std::string>& axes) const;
  // The same ranks for tensors on `device` (comm::for_device): the host group for CPU.
  comm::CommunicatorPtr group_on(const std::vector<std::string>& axes, const c10::Device& device);
  // Which axes `group` spans when it is one of this object's groups (host or device), else null.
  const std::vector<std::string>* axes_of(const comm::Communicator* group) const;

  // A group of named world ranks under `key` (e.g. "tied:embed"), cut on first call and held
  // after. Collective over the world: every rank calls with the group it belongs to.
  const comm::CommunicatorPtr& custom(const std::string& key, const std::vector<int>& ranks);

 private:
  struct Cut {
    std::vector<std::string> axes;  // mesh order, sizes > 1
    comm::CommunicatorPtr host;
    std::map<std::string, comm::CommunicatorPtr> on_device;  // device.str() -> NCCL twin
  };

  Mesh mesh_;
  comm::CommunicatorPtr world_;
  std::map<std::string, Cut> cuts_;  // by Mesh::key
  std::map<std::string, comm::CommunicatorPtr> custom_;
};

}  // namespace zeal::parallel
