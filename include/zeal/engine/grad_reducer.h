// Data-parallel gradient reduction in buckets, overlapped with backward.
//
// The flat gradient buffer is cut into buckets of about reduce_bucket_size elements, walking the
// parameters in reverse order (the order backward produces them). A post-accumulate hook on each
// parameter's gradient accumulator counts the bucket down; a bucket whose gradients are all
// ready is all-reduced asynchronously while backward goes on. Buckets launch strictly in index
// order, so every rank issues the same collectives in the same order even if hooks fire in a
// different order. Parameters that got no gradient are flushed after backward returns.
// Threading: hooks run on the autograd thread; the collectives run on the communicator's thread.
#pragma once

#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/function_hook.h>

#include "zeal/comm/communicator.h"
#include "zeal/core/config.h"

namespace torch::autograd {
struct Node;
}

namespace zeal::engine {

struct GradBucket {
  int64_t begin = 0;  // element range of the flat gradient buffer
  int64_t end = 0;
  int pending = 0;    // parameters not yet ready in this backward
  int num_params = 0;
  bool launched = false;
  comm::WorkPtr work;
  at::Tensor comm_buffer;  // set when communication_data_type differs from the gradient dtype
};

class GradReducer {
 public:
  // params[i] owns elements [offsets[i], offsets[i] + numel) of flat_grads.
  GradReducer(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets, at::Tensor flat_grads,
              comm::CommunicatorPtr comm, const Config& config);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Before a backward: whether this backward's gradients are to be reduced (the accumulation
  // boundary) or only accumulated locally.
  void prepare(bool reduce);
  // After a backward with reduce=true: launches the buckets still waiting, waits for all, and
  // leaves flat_grads averaged over the data-parallel ranks.
  void finish();

  size_t num_buckets() const { return buckets_.size(); }

 private:
  void on_grad_ready(size_t param_index);
  void launch_ready_buckets();
  void launch(GradBucket& bucket);

  at::Tensor flat_grads_;
  comm::CommunicatorPtr comm_;
  std::vector<GradBucket> buckets_;
  std::vector<size_t> bucket_of_param_;
  std::vector<char> param_ready_;
  std::vector<c10::intrusive_ptr<torch::autograd::Node>> accumulators_;
  std::vector<uintptr_t> hook_keys_;
  size_t next_to_launch_ = 0;
  bool reducing_ = false;
  at::ScalarType comm_dtype_;
  double pre_factor_ = 1.0;   // applied before the sum
  double post_factor_ = 1.0;  // applied after it
};

}  // namespace zeal::engine
