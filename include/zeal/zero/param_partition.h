// ZeRO stage 3: parameters partitioned across the data-parallel ranks, gathered whole around use.
//
// Each trainable parameter is one bucket of the flat layout (make_flat_layout with a bucket size
// of 1), padded to a multiple of N; rank r keeps chunk r of every parameter in one contiguous
// shard. A parameter is in one of three states:
//   released  - its .data is an empty tensor; only the shard holds its values;
//   gathering - an all_gather into a fresh full buffer is in flight (prefetch);
//   live      - .data is a view of the full buffer.
// Parameters at or below the persistence threshold are gathered once and stay live; after each
// optimizer step they are gathered again from the updated shards.
//
// Note [Stage 3 agreement]: ranks that take different branches of a model would ask for different
// parameters, and an all_gather pairing rank 0's chunk of `a.weight` with rank 1's chunk of
// `b.weight` would silently assemble garbage (or hang when the counts differ). So each checked
// fetch first all-gathers one token naming what this rank wants; the end of forward and of
// backward send an "end" token. If all ranks agree, the fetch proceeds. If not, every rank (they
// all see the same tokens) gathers every parameter in index order and keeps them live until the
// end of backward: the rest of the pass needs no collective, so divergent ranks finish it safely.
// Prefetches are issued only after a pass in which all ranks agreed at every point, from the same
// trace, so they stay in step too.
//
// Threading: every method runs on the caller's thread (the Python thread in forward, the autograd
// thread in backward); collectives go to the communicator's FIFO thread, so all ranks must call
// fetch/publish in the same order (Note [Stage 3 collective order] in docs/architecture.md).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/comm/communicator.h"
#include "zeal/offload/param_swapper.h"
#include "zeal/zero/layout.h"

namespace zeal::zero {

// offload_param: with `host_shard` the shard lives in host memory (device "cpu") and chunks move
// to the parameters' device as they are gathered; with `nvme_path` set the shard lives in a swap
// file instead (device "nvme"), written once at construction and read chunk by chunk at each gather.
struct ParamOffload {
  bool host_shard = false;
  std::string nvme_path;  // empty: no swap
  offload::AioConfig aio;
  // ZeRO++ qwZ (zero_quantized_weights): non-persistent parameters travel as 8-bit blocks
  // (Note [Quantized gathers]).
  bool quantized_weights = false;
  // ZeRO++ hpZ (zero_hpz_partition_size > 1): the groups of Note [Secondary partition]; null without hpZ.
  comm::CommunicatorPtr hpz_intra;  // the mesh's data_inner group: the ranks of one node
  comm::CommunicatorPtr hpz_inter;  // the other reduction axes: one rank of each node, same data_inner coordinate
};

// Note [Frozen parameters]: parameters that do not require grad have no gradient, fp32 master or
// optimizer state, but at stage 3 they are partitioned and gathered like the others: they follow the
// trainable ones in the partition's indices (trainable_count() and up). Each rank keeps chunk r of
// each (ceil(numel / N) elements, padded with zeros) in a tensor of its own, outside the flat shard
// the optimizer writes, and nothing ever rewrites it but a GatheredParameters modifier (absorb).
// With `quantized` (ZeRO++'s zero_quantized_nontrainable_weights) the chunk of every
// non-persistent frozen parameter is stored as Note [Quantized gathers]' 8-bit message instead,
// quantized once here: the memory it takes is about a quarter of fp32's, gathers send the stored
// message as it is, and every rank computes with the values it stands for. Persistent frozen
// parameters stay exact (they are held whole anyway). With hpZ the frozen copies cross nodes once
// (Note [Secondary partition]), not after every optimizer step as the trainable ones do; stored
// quantized, the copy is the D ranks' messages, and the gathers within the node carry them too.
struct FrozenParams {
  std::vector<at::Tensor> params;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<at::Tensor> chunks;  // this rank's chunk of each, in the model's dtype
  bool quantized = false;
};

class ParamPartition {
 public:
  // params[i] has full shape shapes[i]; shard holds this rank's chunks (layout.owned order) and
  // already has its values. Non-persistent parameters are released here, persistent ones gathered.
  // Frozen parameters (Note [Frozen parameters]) follow with indices params.size() and up.
  using Offload = ParamOffload;
  ParamPartition(std::vector<at::Tensor> params, std::vector<std::vector<int64_t>> shapes, const FlatLayout& layout,
                 at::Tensor shard, comm::CommunicatorPtr comm, int64_t persistence_threshold,
                 const ParamOffload& offload = ParamOffload(), FrozenParams frozen = FrozenParams());
  ~ParamPartition();

  // Agreement-checked gather of the parameters one module (or one backward step) needs.
  void fetch_checked(const std::vector<size_t>& indices);
  // End of a forward: check agreement, then release the non-persistent parameters (unless in
  // fallback). End of a backward: check, release everything, leave fallback.
  void end_forward();
  void end_backward();
  bool in_fallback() const { return fallback_; }
  // Whether a fallback happened since the last call (prefetch trusts only agreed traces).
  bool take_fallback_flag() {
    bool f = fallback_this_step_;
    fallback_this_step_ = false;
    return f;
  }

  void fetch(size_t i);  // start the gather of a released parameter (no-op otherwise)
  void wait(size_t i);   // fetch if needed and make it live
  void release(size_t i);  // back to released, unless persistent
  void release_all();      // every non-persistent parameter
  // Give a released parameter its full shape over uninitialised storage, with no communication:
  // autograd's gradient accumulation reads only the parameter's metadata.
  void shape_only(size_t i);

  size_t size() const { return params_.size(); }              // trainable, then frozen
  size_t trainable_count() const { return trainable_; }
  bool frozen(size_t i) const { return i >= trainable_; }
  int64_t frozen_bytes() const;  // what the frozen chunks take here (quantized, or in the model's dtype)
  int64_t secondary_bytes() const { return secondary_.defined() ? secondary_.nbytes() : 0; }  // hpZ's trainable copy
  bool live(size_t i) const { return state_[i] == State::kLive; }
  bool persistent(size_t i) const { return persistent_[i]; }
  const at::Tensor& full(size_t i) const { return full_[i]; }  // padded full buffer while live
  int64_t index_of_storage(const void* data) const;           // live parameter owning it, or -1

  // After the optimizer step: the shard takes the new values of the owned chunks (cast from the
  // fp32 master); persistent trainable parameters are gathered again.
  void publish(const at::Tensor& master);
  // The same when the caller already wrote the new values into shard(): the regathering half.
  void refresh();
  // A live parameter's full value was changed on every rank alike: copy this rank's chunk of it
  // into the shard (and into master, fp32, when given); a frozen one's into its own chunk
  // (quantized again when stored quantized).
  void absorb(size_t i, at::Tensor* master);

  // This rank's chunks of the trainable parameters, in memory (empty with an NVMe swap: use
  // read_shard / write_shard). Shard coordinates cover the trainable parameters only.
  at::Tensor& shard() { return shard_; }
  const at::Tensor& shard() const { return shard_; }
  bool swapped() const { return swap_ != nullptr; }
  // Shard elements [begin, begin + values.numel()) <- values (cast to the model's dtype), wherever
  // the shard lives; and elements [begin, end) as fp32.
  void write_shard(int64_t begin, const at::Tensor& values);
  at::Tensor read_shard(int64_t begin, int64_t end);
  int64_t shard_numel() const { return shard_numel_; }
  int64_t chunk_begin(size_t i) const { return chunk_begin_[i]; }  // in the shard
  int64_t chunk_size(size_t i) const { return chunk_size_[i]; }
  // Elements of the full buffers held now (live, or gathering for a prefetch), and the most held
  // at once since construction: what stage3_max_live_parameters bounds.
  int64_t live_elements() const { return live_elements_; }
  int64_t peak_live_elements() const { return peak_live_elements_; }
  int64_t numel(size_t i) const { return numel_[i]; }

 private:
  enum class State { kReleased, kGathering, kLive, kShapeOnly };
  void make_live(size_t i);
  bool agree(int64_t token);  // all ranks sent the same token
  void gather_everything();
  at::Tensor chunk_values(size_t i) const;  // this rank's chunk of parameter i, in memory

  std::vector<at::Tensor> params_;
  std::vector<std::vector<int64_t>> shapes_;
  std::vector<int64_t> numel_, chunk_begin_, chunk_size_;
  std::vector<char> persistent_;
  std::vector<State> state_;
  std::vector<at::Tensor> full_;
  std::vector<comm::WorkPtr> work_;
  std::unordered_map<const void*, size_t> live_storage_;
  at::Tensor shard_;
  int64_t shard_numel_ = 0;
  size_t trainable_ = 0;
  // Note [Frozen parameters]: per frozen parameter, its chunk (model dtype; undefined when stored
  // quantized or swapped), its stored message, and hpZ's copy within the node, [D, chunk] (or
  // [D, message bytes] when stored quantized).
  std::vector<at::Tensor> own_chunk_, stored_, frozen_secondary_;
  bool frozen_secondary_stale_ = true;
  void build_frozen_secondary();
  at::TensorOptions options_;  // the full parameters' dtype and device
  std::unique_ptr<offload::ParamSwapper> swap_;
  std::vector<at::Tensor> staging_;  // a gather's input chunk, alive until the gather completes
  // Note [Quantized gathers]: with qwZ each rank quantizes its chunk of a non-persistent parameter
  // in blocks of comm::kWeightBlock (the chunk's last block may be shorter, so a partition may cut
  // a block anywhere) and sends one message: the levels, padded to 4 bytes, then the block scales.
  // The gather receives every rank's message into wire_[i]; make_live dequantizes each chunk,
  // this rank's own too, so every rank computes with the same values. The shard and the fp32
  // master are never quantized: checkpoints do not depend on qwZ. Persistent parameters, gathered
  // once per step, stay exact.
  bool quantized_ = false;
  std::vector<at::Tensor> wire_;
  int64_t wire_bytes(size_t i) const;
  at::Tensor weight_message(size_t i, const at::Tensor& chunk) const;  // chunk i (its values) as one message
  // Note [Secondary partition]: hpZ's copy, within a node, of the parameters. The reduction group
  // of W ranks is D nodes x H ranks (data_inner fastest), so rank d*H + j owns primary chunk
  // P_(d*H+j) of every parameter. Rank (d, j) also holds S_j = [P_j, P_(H+j), ..., P_((D-1)H+j)]
  // of every parameter, D/W of it: the one all_gather of the whole shard over hpz_inter (the only
  // traffic between nodes, once per optimizer step), made at the first fetch after the shard
  // changed (every rank fetches in the same order: Note [Stage 3 agreement]). A fetch then
  // all-gathers S_0..S_(H-1) over hpz_intra into hpz_gathered_[i], and make_live reorders them
  // into the full parameter (element for element what the primary gather gives: hpZ is exact).
  // With qwZ, the copy crosses nodes quantized (each chunk as qwZ alone sends it) and the gathers
  // inside the node carry the dequantized values. Persistent parameters still gather over the
  // whole group.
  comm::CommunicatorPtr hpz_intra_, hpz_inter_;
  at::Tensor secondary_;  // D shards of this node-column, [D, shard_numel]
  bool secondary_stale_ = true;
  std::vector<at::Tensor> hpz_gathered_;
  void build_secondary();
  // Note [Swapped chunk read-ahead]: with an NVMe swap, fetch(i) only starts reading chunk i and
  // queues it; the all_gather of a queued chunk is issued, in queue order, once more than
  // kReadAhead reads are queued, or when the chunk is needed (make_live, release). Which gathers
  // are issued at each call depends only on the sequence of calls, never on how fast a read
  // finished, so every rank issues its collectives in the same order (Note [Stage 3 agreement]).
  static constexpr size_t kReadAhead = 2;
  std::deque<size_t> read_queue_;
  std::vector<offload::IoHandle> read_handle_;
  void issue_queued(size_t until);  // issue the gathers of the queue, front first, through `until`
  void issue_front();
  at::Tensor empty_;
  comm::CommunicatorPtr comm_;
  int64_t live_elements_ = 0;
  int64_t peak_live_elements_ = 0;
  bool fallback_ = false;            // every parameter gathered until the end of backward
  bool fallback_this_step_ = false;  // a fallback happened since the last end_backward
};

}  // namespace zeal::zero
