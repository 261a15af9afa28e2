// Note [Sharded-state units]: the engine's parameters fall into units, one per distinct reduction
// group (the mesh axes their gradients are averaged over, Note [Parameter placement]). A unit is
// everything ZeRO keeps for its parameters over that one group: the flat layout padded to the
// group's size, the flat model-dtype buffers the parameters are views of, the gradient reducer, the
// stage-3 partition, the fp32 master copy and optimizer state of the elements this rank owns
// (engine/master_store.h: on the device, in pinned host memory, or in NVMe swap files) and the
// optimizer's segments over them.
// Units share nothing but the engine: one autograd pass fills every unit's buckets, and the step
// adds each unit's sum of squares into one norm before any unit updates. A model whose parameters
// all reduce over one group (plain data parallelism, ZeRO, a pipeline stage, a tensor rank) has one
// unit; dense weights beside sequence-split or expert weights have two.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/comm/communicator.h"
#include "zeal/comm/compressed.h"
#include "zeal/engine/grad_reducer.h"
#include "zeal/engine/master_store.h"
#include "zeal/optim/optimizer.h"
#include "zeal/zero/layout.h"
#include "zeal/zero/param_partition.h"

namespace zeal::engine {

class Unit {
 public:
  Unit(std::vector<std::string> axes, comm::CommunicatorPtr world, comm::CommunicatorPtr model_parallel,
       at::ScalarType model_dtype, at::Device device, bool partitioned)
      : axes(std::move(axes)), world(std::move(world)), model_parallel(std::move(model_parallel)),
        model_dtype(model_dtype), device(device), partitioned(partitioned) {}

  const std::vector<std::string> axes;         // the mesh axes the gradients reduce over
  const comm::CommunicatorPtr world;           // that group, on the parameters' device
  const comm::CommunicatorPtr model_parallel;  // the complement: the ranks holding the rest of one replica (null if none)
  std::vector<comm::CommunicatorPtr> counted_groups;  // further groups the comms_logger counts (hpZ's, MiCS's)
  // Note [MiCS]: the ranks holding the same shards as this one (world is then the shard group), or null.
  comm::CommunicatorPtr replicas;
  const at::ScalarType model_dtype;
  const at::Device device;
  const bool partitioned;  // ZeRO stage >= 1: master weights and optimizer state cover owned chunks

  // The unit's parameters: their engine indices, and (in the same, unit, order) the tensors and
  // their full shapes, which the layout, reducer and partition index.
  std::vector<size_t> members;
  std::vector<at::Tensor> params;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<size_t> uncounted;  // unit indices held here but counted in the norm by another rank
  int grad_divisor = 0;  // the ranks the summed gradient is divided by (Note [Expert gradients]); 0: world's size

  zero::FlatLayout layout;
  std::vector<zero::OwnedRange> owned;
  at::Tensor flat_params;      // model dtype; the parameters are views into it (stages 0-2)
  at::Tensor flat_grads;       // model dtype; the parameters' .grad are views into it (stages 0, 1)
  at::Tensor grad_shard;       // stages 2, 3: this rank's reduce-scattered gradients
  at::Tensor stage3_shard;     // handed to partition once the reducer exists
  // fp32 master weights of the owned elements (flat_params itself at stage 0, fp32) and where they
  // and the optimizer state live (Note [Master store]).
  std::unique_ptr<MasterStore> store;
  comm::OneBitState onebit_state;                      // OneBitAdam: the compressed all-reduce's error buffers
  std::unique_ptr<zero::ParamPartition> partition;    // stage 3
  std::vector<optim::ParamGroup> segments;  // the user's groups' pieces in local (owned) coordinates
  std::vector<size_t> segment_group;
  // ZeRO stage 1 with replicated optimizer state (Note [Replicated momentum] in optim/optimizer.cpp):
  // the groups' whole flat ranges, cut where this rank's ownership starts and ends.
  std::vector<optim::ParamGroup> flat_segments;
  std::vector<size_t> flat_segment_group;
  std::unique_ptr<GradReducer> reducer;
  std::unique_ptr<optim::Optimizer> optimizer;

  int64_t shard_size() const { return layout.shard_size(partitioned); }
  std::vector<zero::Fragment> fragments() const { return zero::fragments(layout, owned); }
  at::Tensor gather_owned(const at::Tensor& flat) const;  // the owned ranges of a flat buffer, concatenated
  // The whole flat buffer from every rank's owned values of it (a sum all-reduce over zeros).
  at::Tensor gather_whole(const at::Tensor& local);
  // In place over `group`, moving values to where its backend reduces them and back.
  void all_reduce(at::Tensor& values, comm::ReduceOp op, comm::Communicator& group) const;
  void all_reduce_sum(at::Tensor& values) const { all_reduce(values, comm::ReduceOp::kSum, *world); }
  // Unscales grads in place and returns this unit's sum of squares of the result, each value once
  // over the whole mesh: summed over the group when `partitioned` (grads in owned coordinates), and
  // over the model-parallel complement.
  double global_sum_squares(const at::Tensor& grads, double inv_scale, bool grads_partitioned);
  // The updated weights (fp32, owned coordinates) -> the model's parameters on every rank of the
  // group: write_model_values, then gather_published (below stage 1, a copy or nothing).
  void publish(const at::Tensor& source);
  // The two halves of publishing: this rank's updated values (fp32, owned coordinates from
  // local_begin) into the model-dtype parameters it owns; then the collective that spreads them.
  void write_model_values(int64_t local_begin, const at::Tensor& values);
  void gather_published();
  at::Tensor read_model_values(int64_t local_begin, int64_t local_end);  // owned, as fp32
};

}  // namespace zeal::engine
