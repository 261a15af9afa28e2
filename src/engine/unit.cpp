#include "zeal/engine/unit.h"

#include <algorithm>

#include <ATen/ATen.h>

#include "zeal/optim/cpu_optim.h"

namespace zeal::engine {

at::Tensor Unit::gather_owned(const at::Tensor& flat) const {
  std::vector<at::Tensor> pieces;
  for (const zero::OwnedRange& o : owned) pieces.push_back(flat.slice(0, o.flat_begin, o.flat_end));
  // A rank can own nothing: a model of zero-element parameters, or more ranks than elements.
  if (pieces.empty()) return at::empty({0}, flat.options());
  return at::cat(pieces);
}

at::Tensor Unit::gather_whole(const at::Tensor& local) {
  at::Tensor whole = at::zeros({layout.total}, local.options());
  for (const zero::OwnedPiece& p : zero::owned_pieces_local(owned, 0, local.numel()))
    whole.slice(0, p.flat_begin, p.flat_begin + p.size).copy_(local.slice(0, p.local_begin, p.local_begin + p.size));
  if (world->size() > 1) all_reduce_sum(whole);  // exact: every element is one rank's value plus zeros
  return whole;
}

void Unit::all_reduce(at::Tensor& values, comm::ReduceOp op, comm::Communicator& group) const {
  // The MPI backend reduces host tensors and NCCL device tensors: values elsewhere (device values
  // over MPI, offloaded host values over NCCL) take a round trip.
  const bool mpi = group.backend_name() == "mpi";
  const bool moved = mpi ? !values.device().is_cpu() : values.device() != device;
  at::Tensor buffer = !moved ? values : values.to(mpi ? at::Device(at::kCPU) : device);
  group.all_reduce(buffer, {op})->wait();
  if (moved) values.copy_(buffer);
}

double Unit::global_sum_squares(const at::Tensor& grads, double inv_scale, bool grads_partitioned) {
  double local = optim::unscale_and_sum_squares(grads, inv_scale);
  if (!uncounted.empty()) {
    // Another rank of the model-parallel group counts these (already unscaled above).
    auto sum_sq_of = [](const at::Tensor& x) { return x.to(at::kDouble).pow(2).sum().item<double>(); };
    for (size_t i : uncounted) {
      const int64_t b = layout.offsets[i], e = b + layout.numels[i];
      if (!grads_partitioned) {
        local -= sum_sq_of(grads.slice(0, b, e));
        continue;
      }
      for (const zero::OwnedPiece& p : zero::owned_pieces_flat(owned, b, e))
        local -= sum_sq_of(grads.slice(0, p.local_begin, p.local_begin + p.size));
    }
    local = std::max(local, 0.0);
  }
  double sum_sq = local;
  if (grads_partitioned && world->size() > 1) {
    // Each rank holds a disjoint part of the gradient: sum the squares across ranks.
    at::Tensor t = at::full({1}, local, at::TensorOptions().dtype(at::kDouble).device(grads.device()));
    all_reduce_sum(t);
    sum_sq = t.item<double>();
  }
  if (model_parallel && model_parallel->size() > 1) {
    // Stages, shards and slices hold disjoint parameters: the norm (and fp16's overflow) is the whole model's.
    at::Tensor t = at::full({1}, sum_sq, at::TensorOptions().dtype(at::kDouble));
    all_reduce(t, comm::ReduceOp::kSum, *model_parallel);
    sum_sq = t.item<double>();
  }
  return sum_sq;
}

void Unit::publish(const at::Tensor& source) {
  if (!partitioned) {
    if (model_dtype != at::kFloat) flat_params.copy_(source);
    return;
  }
  write_model_values(0, source);
  gather_published();
}

void Unit::write_model_values(int64_t local_begin, const at::Tensor& values) {
  const int64_t local_end = local_begin + values.numel();
  if (partition) {
    partition->write_shard(local_begin, values);
    return;
  }
  for (const zero::OwnedPiece& p : zero::owned_pieces_local(owned, local_begin, local_end))
    flat_params.slice(0, p.flat_begin, p.flat_begin + p.size)
        .copy_(values.slice(0, p.local_begin - local_begin, p.local_begin - local_begin + p.size));
}

at::Tensor Unit::read_model_values(int64_t local_begin, int64_t local_end) {
  if (stage3_shard.defined()) return stage3_shard.slice(0, local_begin, local_end).to(at::kFloat);
  if (partition) return partition->read_shard(local_begin, local_end);
  at::Tensor out = at::empty({local_end - local_begin}, at::TensorOptions().dtype(at::kFloat));
  for (const zero::OwnedPiece& p : zero::owned_pieces_local(owned, local_begin, local_end))
    out.slice(0, p.local_begin - local_begin, p.local_begin - local_begin + p.size)
        .copy_(flat_params.slice(0, p.flat_begin, p.flat_begin + p.size));
  return out;
}

void Unit::gather_published() {
  if (partition) {
    partition->refresh();
    return;
  }
  if (world->size() == 1) return;
  // Every rank wrote its updated chunks: all-gather each bucket so every rank has all weights.
  std::vector<comm::WorkPtr> works;
  std::vector<at::Tensor> inputs;
  size_t next_owned = 0;  // owned holds one range per non-empty bucket, in bucket order
  for (const zero::Bucket& bucket : layout.buckets) {
    if (bucket.end == bucket.begin) continue;
    const zero::OwnedRange& mine = owned[next_owned++];
    inputs.push_back(flat_params.slice(0, mine.flat_begin, mine.flat_end).clone());
    at::Tensor output = flat_params.slice(0, bucket.begin, bucket.end);
    works.push_back(world->all_gather(output, inputs.back(), {}));
  }
  for (auto& w : works) w->wait();
}

}  // namespace zeal::engine
