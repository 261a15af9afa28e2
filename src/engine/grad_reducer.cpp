#include "zeal/engine/grad_reducer.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <ATen/ops/empty.h>

#include "zeal/core/error.h"

namespace zeal::engine {

GradReducer::GradReducer(const std::vector<at::Tensor>& params, const zero::FlatLayout& layout, at::Tensor flat_grads,
                         at::Tensor grad_shard, comm::CommunicatorPtr comm, const Config& config)
    : flat_grads_(std::move(flat_grads)), grad_shard_(std::move(grad_shard)), comm_(std::move(comm)) {
  bucket_of_param_.assign(params.size(), 0);
  param_ready_.assign(params.size(), 0);
  int64_t shard_offset = 0;
  for (const zero::Bucket& b : layout.buckets) {
    GradBucket bucket;
    bucket.begin = b.begin;
    bucket.end = b.end;
    bucket.shard_begin = shard_offset;
    bucket.num_params = static_cast<int>(b.params.size());
    shard_offset += b.chunk(layout.world);
    for (size_t p : b.params) bucket_of_param_[p] = buckets_.size();
    buckets_.push_back(bucket);
  }
  switch (config.communication_data_type) {
    case CommDtype::kDefault: comm_dtype_ = flat_grads_.scalar_type(); break;
    case CommDtype::kFp32: comm_dtype_ = at::kFloat; break;
    case CommDtype::kFp16: comm_dtype_ = at::kHalf; break;
    case CommDtype::kBf16: comm_dtype_ = at::kBFloat16; break;
  }
  const double world = comm_->size();
  if (config.prescale_gradients) {
    pre_factor_ = 1.0 / config.gradient_predivide_factor;
    post_factor_ = config.gradient_predivide_factor / world;
  } else {
    post_factor_ = 1.0 / world;
  }
  if (comm_->size() == 1) return;  // nothing to reduce, no hooks needed
  for (size_t i = 0; i < params.size(); ++i) {
    auto accumulator = torch::autograd::impl::grad_accumulator(params[i]);
    ZEAL_INTERNAL_ASSERT(accumulator, "parameter ", i, " has no gradient accumulator");
    hook_keys_.push_back(accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [this, i](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          on_grad_ready(i);
          return outputs;
        })));
    accumulators_.push_back(std::move(accumulator));
  }
}

GradReducer::~GradReducer() {
  for (size_t i = 0; i < accumulators_.size(); ++i) accumulators_[i]->del_post_hook(hook_keys_[i]);
  for (auto& b : buckets_) {
    if (b.work && !b.work->is_completed()) {
      try {
        b.work->wait();
      } catch (...) {
      }
    }
  }
}

void GradReducer::prepare(bool reduce) {
  reducing_ = reduce && comm_->size() > 1;
  if (!reducing_) return;
  next_to_launch_ = 0;
  std::fill(param_ready_.begin(), param_ready_.end(), 0);
  for (auto& b : buckets_) {
    b.pending = b.num_params;
    b.work.reset();
  }
}

void GradReducer::on_grad_ready(size_t param_index) {
  if (!reducing_ || param_ready_[param_index]) return;
  param_ready_[param_index] = 1;
  --buckets_[bucket_of_param_[param_index]].pending;
  launch_ready_buckets();
}

void GradReducer::launch_ready_buckets() {
  while (next_to_launch_ < buckets_.size() && buckets_[next_to_launch_].pending == 0)
    launch(buckets_[next_to_launch_++]);
}

void GradReducer::launch(GradBucket& bucket) {
  at::Tensor grads = flat_grads_.slice(0, bucket.begin, bucket.end);
  at::Tensor payload = grads;
  if (comm_dtype_ != grads.scalar_type()) {
    // The local contribution travels in comm_dtype: round it here, so every rank sums the same values.
    bucket.comm_buffer = grads.to(comm_dtype_);
    payload = bucket.comm_buffer;
  }
  if (pre_factor_ != 1.0) payload.mul_(pre_factor_);
  if (grad_shard_.defined()) {
    int64_t chunk = (bucket.end - bucket.begin) / comm_->size();
    at::Tensor out = grad_shard_.slice(0, bucket.shard_begin, bucket.shard_begin + chunk);
    if (comm_dtype_ != out.scalar_type()) {
      bucket.comm_output = at::empty({chunk}, out.options().dtype(comm_dtype_));
      out = bucket.comm_output;
    }
    bucket.work = comm_->reduce_scatter(out, payload, {comm::ReduceOp::kSum});
  } else {
    bucket.work = comm_->all_reduce(payload, {comm::ReduceOp::kSum});
  }
}

void GradReducer::finish() {
  if (!reducing_) {
    // One rank (stage 2): its shard is the whole, unreduced gradient buffer.
    if (grad_shard_.defined() && comm_->size() == 1) grad_shard_.copy_(flat_grads_);
    return;
  }
  // Parameters that took no part in this backward never fired their hook: release them now.
  for (auto& b : buckets_) b.pending = 0;
  launch_ready_buckets();
  for (auto& b : buckets_) {
    b.work->wait();
    at::Tensor grads;
    if (grad_shard_.defined()) {
      int64_t chunk = (b.end - b.begin) / comm_->size();
      grads = grad_shard_.slice(0, b.shard_begin, b.shard_begin + chunk);
      if (b.comm_output.defined()) grads.copy_(b.comm_output);
    } else {
      grads = flat_grads_.slice(0, b.begin, b.end);
      if (b.comm_buffer.defined()) grads.copy_(b.comm_buffer);
    }
    b.comm_buffer.reset();
    b.comm_output.reset();
    if (post_factor_ != 1.0) grads.mul_(post_factor_);
  }
  reducing_ = false;
}

}  // namespace zeal::engine
