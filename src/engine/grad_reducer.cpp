#include "zeal/engine/grad_reducer.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "zeal/core/error.h"

namespace zeal::engine {

GradReducer::GradReducer(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets,
                         at::Tensor flat_grads, comm::CommunicatorPtr comm, const Config& config)
    : flat_grads_(std::move(flat_grads)), comm_(std::move(comm)) {
  const int64_t bucket_size = config.zero_optimization.reduce_bucket_size;
  bucket_of_param_.assign(params.size(), 0);
  param_ready_.assign(params.size(), 0);
  // Walk parameters last to first; a bucket closes once it holds bucket_size elements. Because
  // parameters are laid out in order, each bucket is one contiguous range of the flat buffer.
  for (size_t k = params.size(); k-- > 0;) {
    int64_t begin = offsets[k], end = offsets[k] + params[k].numel();
    if (buckets_.empty() || buckets_.back().end - buckets_.back().begin >= bucket_size) {
      buckets_.push_back(GradBucket{begin, end});
    }
    GradBucket& b = buckets_.back();
    ZEAL_INTERNAL_ASSERT(end == b.begin || b.num_params == 0, "parameters are not laid out contiguously");
    b.begin = begin;
    ++b.num_params;
    bucket_of_param_[k] = buckets_.size() - 1;
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
    b.launched = false;
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
  bucket.work = comm_->all_reduce(payload, {comm::ReduceOp::kSum});
  bucket.launched = true;
}

void GradReducer::finish() {
  if (!reducing_) return;
  // Parameters that took no part in this backward never fired their hook: release them now.
  for (auto& b : buckets_) b.pending = 0;
  launch_ready_buckets();
  for (auto& b : buckets_) {
    b.work->wait();
    at::Tensor grads = flat_grads_.slice(0, b.begin, b.end);
    if (b.comm_buffer.defined()) {
      grads.copy_(b.comm_buffer);
      b.comm_buffer.reset();
    }
    if (post_factor_ != 1.0) grads.mul_(post_factor_);
  }
  reducing_ = false;
}

}  // namespace zeal::engine
