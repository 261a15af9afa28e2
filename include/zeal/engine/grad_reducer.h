// Data-parallel gradient reduction in buckets, overlapped with backward.
//
// The buckets are those of the flat layout (zero/layout.h): parameters last to first, each bucket
// a contiguous, padded range of the flat gradient buffer. A post-accumulate hook on each
// parameter's gradient accumulator counts its bucket down; a bucket whose gradients are all ready
// is reduced asynchronously while backward goes on: all_reduce in place (ZeRO stages 0 and 1), or
// reduce_scatter into this rank's chunk of the gradient shard (stage 2). Buckets launch strictly
// in index order, so every rank issues the same collectives in the same order even if hooks fire
// in a different order. Parameters that got no gradient are flushed after backward returns.
//
// Two modes:
//   in place     (stage 0, 1, or stage 2 without reduce_scatter): autograd accumulates into views of
//                one full flat gradient buffer; buckets are reduced on the accumulation boundary only.
//   partitioned  (stage 2, 3): every backward, each parameter's fresh .grad is copied into its
//                bucket's staging buffer and dropped at once; a full bucket is reduce-scattered and
//                its chunk added into this rank's gradient shard, so no full-size gradient buffer
//                exists (at most a few buckets in flight). Accumulation happens in the shard.
// Threading: hooks run on the autograd thread; the collectives run on the communicator's thread.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/function_hook.h>

#include "zeal/comm/communicator.h"
#include "zeal/comm/quantized.h"
#include "zeal/core/config.h"
#include "zeal/zero/layout.h"

namespace torch::autograd {
struct Node;
}

namespace zeal::engine {

struct GradBucket {
  int64_t begin = 0;  // padded element range of the flat gradient buffer
  int64_t end = 0;
  int64_t shard_begin = 0;  // where this rank's chunk goes in the gradient shard (reduce_scatter)
  int pending = 0;          // parameters not yet ready in this backward
  int num_params = 0;
  bool matrix = false;      // holds a parameter of two or more dimensions (qgZ quantizes only these)
  comm::WorkPtr work;
  at::Tensor comm_buffer;  // the bucket in communication_data_type, when that differs; partitioned: staging
  at::Tensor comm_output;  // reduce_scatter's output in communication_data_type, when that differs
  bool retired = true;     // partitioned: its chunk has been added to the shard
};

// Calls into the owner of the parameters (stage 3 gathers and releases around accumulation).
struct GradHooks {
  std::function<void(size_t)> before_accumulate;  // autograd is about to accumulate parameter i
  std::function<void(size_t)> after_accumulate;   // parameter i's gradient has been consumed
};

class GradReducer {
 public:
  // In place: flat_grads holds every parameter's gradient at layout.offsets; grad_shard, when
  // defined, receives the reduce-scatter on the boundary. Partitioned (flat_grads undefined):
  // grad_shard (layout.shard_size(true) elements) accumulates this rank's reduced chunks.
  // The reduced sum is divided by `divisor` ranks (Note [Expert gradients] in parallel/placement.h;
  // 0: the group's size).
  GradReducer(const std::vector<at::Tensor>& params, const zero::FlatLayout& layout, at::Tensor flat_grads,
              at::Tensor grad_shard, comm::CommunicatorPtr comm, const Config& config, GradHooks hooks = {},
              int divisor = 0);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Before a backward: whether this backward's gradients are to be reduced (the accumulation
  // boundary) or only accumulated locally. Partitioned mode reduces every backward.
  void prepare(bool reduce);
  // After a backward with reduce=true: launches the buckets still waiting, waits for all, and
  // leaves the gradients averaged over the data-parallel ranks (in flat_grads, or in grad_shard).
  void finish();
  bool partitioned() const { return partitioned_; }
  // Called on the accumulation boundary as each bucket's reduced gradients become final, in
  // bucket order: with the bucket's range of the flat buffer and, partitioned, of the shard.
  // Partitioned mode retires buckets while backward is still running, so ZeRO-Offload's copy of
  // a bucket to the host overlaps the rest of backward.
  using BucketFinal = std::function<void(int64_t flat_begin, int64_t flat_end, int64_t shard_begin, int64_t shard_end)>;
  void set_bucket_final(BucketFinal callback) { bucket_final_ = std::move(callback); }

  size_t num_buckets() const { return buckets_.size(); }

  // ZeRO++ qgZ (zero_quantized_gradients), partitioned mode: the reduce-scatter of each bucket
  // holding a parameter of two or more dimensions becomes Note [Quantized gradient reduction] over
  // intra (the node: the mesh's data_inner group, possibly one rank) and inter (the rest of the
  // reduction group).
  void set_quantized_gradients(comm::CommunicatorPtr intra, comm::CommunicatorPtr inter) {
    qgz_intra_ = std::move(intra);
    qgz_inter_ = std::move(inter);
  }
  // Note [MiCS]: partitioned mode, each reduced chunk is also summed over these ranks (the replicas
  // of this rank's shard) before it is added to the shard.
  void set_replicas(comm::CommunicatorPtr replicas) { replicas_ = std::move(replicas); }
  // LoCo (zeropp_loco_param) on qgZ's quantizations: Note [LoCo error feedback].
  void set_loco(float err_beta, int64_t reset_T);
  bool loco() const { return loco_reset_T_ > 0; }
  // LoCo's state for a checkpoint: every bucket's errors (within the node, then across nodes, each
  // present only where that hop runs) as 8-bit levels and scales concatenated in bucket order, zeros
  // where a bucket has none yet, and the reductions done. Same sizes on every rank of one layout.
  struct LocoState {
    at::Tensor levels;  // uint8
    at::Tensor scales;  // fp32
    int64_t reductions = 0;
  };
  LocoState loco_state() const;
  // Restores a saved state; false (and the errors cleared) when its sizes do not fit this layout.
  bool restore_loco(const LocoState& state);
  void clear_loco();

 private:
  void on_grad_ready(size_t param_index);
  void launch_ready_buckets();
  void launch(GradBucket& bucket);
  void retire(GradBucket& bucket);  // partitioned: wait, add the chunk to the shard, free staging
  void stage_gradient(size_t param_index);
  at::Tensor quantized_reduce_scatter(const at::Tensor& input, int64_t chunk, size_t bucket);
  comm::CommunicatorPtr qgz_intra_, qgz_inter_;
  comm::CommunicatorPtr replicas_;
  // Note [LoCo error feedback]: per bucket, the error of the hop within the node and of the hop
  // across nodes, kept as 8-bit blocks between reductions (undefined: zero).
  struct LocoErrors {
    comm::Quantized intra, inter;
  };
  std::vector<LocoErrors> loco_errors_;
  float loco_beta_ = 0.0f;
  int64_t loco_reset_T_ = 0;  // 0: LoCo off
  int64_t loco_reductions_ = 0;
  // Elements of each hop's error in bucket b (0 where the hop does not run).
  std::pair<int64_t, int64_t> loco_sizes(const GradBucket& b) const;

  at::Tensor flat_grads_;
  at::Tensor grad_shard_;
  comm::CommunicatorPtr comm_;
  std::vector<GradBucket> buckets_;
  std::vector<at::Tensor> params_;
  std::vector<int64_t> offsets_;
  GradHooks hooks_;
  bool partitioned_ = false;
  std::vector<size_t> bucket_of_param_;
  std::vector<char> param_ready_;
  // One per hooked parameter: removes this reducer's hooks from its gradient accumulator (which the
  // closure keeps alive). A closure, because torch changed the accumulator's pointer type (shared_ptr
  // up to 2.11, intrusive_ptr in 2.13), and Zeal builds against both (the GPU machine has 2.11).
  std::vector<std::function<void()>> unhooks_;
  size_t next_to_launch_ = 0;
  int64_t round_ = 0;  // backward passes prepared: part of each bucket's call site
  bool reducing_ = false;
  bool boundary_ = false;  // this backward ends an accumulation
  BucketFinal bucket_final_;
  at::ScalarType comm_dtype_;
  double pre_factor_ = 1.0;   // applied before the sum
  double post_factor_ = 1.0;  // applied after it
};

}  // namespace zeal::engine
