#include "zeal/engine/grad_reducer.h"

#include <algorithm>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "zeal/comm/quantized.h"
#include "zeal/core/error.h"

namespace zeal::engine {
namespace {

// Runs a callback before autograd accumulates into a parameter (stage 3 gives a released
// parameter its shape there).
struct BeforeAccumulate : torch::autograd::FunctionPreHook {
  explicit BeforeAccumulate(std::function<void()> fn) : fn_(std::move(fn)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    fn_();
    return grads;
  }
  std::function<void()> fn_;
};

// Partitioned mode keeps at most this many buckets in flight before waiting for the oldest: it
// bounds the staging memory to a few buckets while still overlapping with backward.
constexpr int kMaxBucketsInFlight = 2;

}  // namespace

GradReducer::GradReducer(const std::vector<at::Tensor>& params, const zero::FlatLayout& layout, at::Tensor flat_grads,
                         at::Tensor grad_shard, comm::CommunicatorPtr comm, const Config& config, GradHooks hooks,
                         int divisor)
    : flat_grads_(std::move(flat_grads)),
      grad_shard_(std::move(grad_shard)),
      comm_(std::move(comm)),
      params_(params),
      offsets_(layout.offsets),
      hooks_(std::move(hooks)) {
  partitioned_ = !flat_grads_.defined();
  ZEAL_INTERNAL_ASSERT(!partitioned_ || grad_shard_.defined(), "partitioned gradients need a shard");
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
    for (size_t p : b.params) {
      bucket_of_param_[p] = buckets_.size();
      bucket.matrix = bucket.matrix || params[p].dim() >= 2;
    }
    buckets_.push_back(bucket);
  }
  at::ScalarType grad_dtype = partitioned_ ? grad_shard_.scalar_type() : flat_grads_.scalar_type();
  switch (config.communication_data_type) {
    case CommDtype::kDefault: comm_dtype_ = grad_dtype; break;
    case CommDtype::kFp32: comm_dtype_ = at::kFloat; break;
    case CommDtype::kFp16: comm_dtype_ = at::kHalf; break;
    case CommDtype::kBf16: comm_dtype_ = at::kBFloat16; break;
  }
  const double world = divisor > 0 ? divisor : comm_->size();
  if (config.prescale_gradients) {
    pre_factor_ = 1.0 / config.gradient_predivide_factor;
    post_factor_ = config.gradient_predivide_factor / world;
  } else {
    post_factor_ = 1.0 / world;
  }
  if (comm_->size() == 1 && !partitioned_) return;  // nothing to reduce, no hooks needed
  for (size_t i = 0; i < params.size(); ++i) {
    auto accumulator = torch::autograd::impl::grad_accumulator(params[i]);
    ZEAL_INTERNAL_ASSERT(accumulator, "parameter ", i, " has no gradient accumulator");
    uintptr_t key = accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [this, i](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          on_grad_ready(i);
          return outputs;
        }));
    if (hooks_.before_accumulate)
      accumulator->add_pre_hook(std::make_unique<BeforeAccumulate>([this, i] { hooks_.before_accumulate(i); }));
    unhooks_.push_back([accumulator, key] {
      accumulator->del_post_hook(key);
      auto& pre = accumulator->pre_hooks();
      pre.erase(std::remove_if(pre.begin(), pre.end(),
                               [](const auto& h) { return dynamic_cast<BeforeAccumulate*>(h.get()) != nullptr; }),
                pre.end());
    });
  }
}

GradReducer::~GradReducer() {
  for (auto& unhook : unhooks_) unhook();
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
  ++round_;
  boundary_ = reduce;
  reducing_ = partitioned_ || (reduce && comm_->size() > 1);
  if (!reducing_) return;
  if (loco() && loco_reductions_++ % loco_reset_T_ == 0) clear_loco();  // Note [LoCo error feedback]
  next_to_launch_ = 0;
  std::fill(param_ready_.begin(), param_ready_.end(), 0);
  for (auto& b : buckets_) {
    b.pending = b.num_params;
    b.work.reset();
    b.retired = false;
  }
}

void GradReducer::on_grad_ready(size_t param_index) {
  if (!reducing_ || param_ready_[param_index]) return;
  param_ready_[param_index] = 1;
  if (partitioned_) stage_gradient(param_index);
  --buckets_[bucket_of_param_[param_index]].pending;
  launch_ready_buckets();
}

void GradReducer::stage_gradient(size_t i) {
  // The fresh gradient moves into its bucket's staging buffer and the parameter lets go of it.
  GradBucket& b = buckets_[bucket_of_param_[i]];
  if (!b.comm_buffer.defined()) b.comm_buffer = at::zeros({b.end - b.begin}, grad_shard_.options().dtype(comm_dtype_));
  at::Tensor& grad = params_[i].mutable_grad();
  if (grad.defined()) {
    int64_t begin = offsets_[i] - b.begin;
    b.comm_buffer.slice(0, begin, begin + grad.numel()).copy_(grad.reshape({-1}));
    grad.reset();
  }
  if (hooks_.after_accumulate) hooks_.after_accumulate(i);
}

void GradReducer::launch_ready_buckets() {
  while (next_to_launch_ < buckets_.size() && buckets_[next_to_launch_].pending == 0) {
    launch(buckets_[next_to_launch_++]);
    if (!partitioned_) continue;
    // Retire finished buckets and cap the number in flight, oldest first.
    int in_flight = 0;
    for (size_t k = next_to_launch_; k-- > 0;) {
      GradBucket& b = buckets_[k];
      if (b.retired) break;
      ++in_flight;
    }
    for (size_t k = 0; k < next_to_launch_ && in_flight > 0; ++k) {
      GradBucket& b = buckets_[k];
      if (b.retired) continue;
      if (in_flight > kMaxBucketsInFlight || !b.work || b.work->is_completed()) {
        retire(b);
        --in_flight;
      } else {
        break;  // keep retirement in order
      }
    }
  }
}

void GradReducer::launch(GradBucket& bucket) {
  // The call site in each rank's signature: a rank that skips a bucket or a round is named at once.
  const std::string site = "grad bucket " + std::to_string(&bucket - buckets_.data()) + " round " + std::to_string(round_);
  if (partitioned_) {
    if (!bucket.comm_buffer.defined())  // no parameter of this bucket got a gradient
      bucket.comm_buffer = at::zeros({bucket.end - bucket.begin}, grad_shard_.options().dtype(comm_dtype_));
    if (pre_factor_ != 1.0) bucket.comm_buffer.mul_(pre_factor_);
    if (comm_->size() > 1) {
      int64_t chunk = (bucket.end - bucket.begin) / comm_->size();
      if (qgz_inter_ && bucket.matrix) {  // synchronous: the bucket is retired with its chunk already reduced
        bucket.comm_output = quantized_reduce_scatter(bucket.comm_buffer, chunk, &bucket - buckets_.data())
                                 .to(bucket.comm_buffer.scalar_type());
      } else {
        bucket.comm_output = at::empty({chunk}, bucket.comm_buffer.options());
        bucket.work = comm_->reduce_scatter(bucket.comm_output, bucket.comm_buffer, {comm::ReduceOp::kSum, {}, site});
      }
    }  // else the staging buffer is the whole (only) chunk
    if (replicas_ && replicas_->size() > 1) {
      // Note [MiCS]: the reduced chunk summed over the replicas, issued here, in bucket order, after
      // the shard group's reduction has finished: every rank then issues its collectives on the two
      // groups in the same order (an all-reduce issued at retirement, whose timing varies by rank,
      // could pass a shard-group gather on one rank and not on another, and both would wait).
      if (bucket.work) bucket.work->wait();
      at::Tensor& reduced = comm_->size() == 1 ? bucket.comm_buffer : bucket.comm_output;
      bucket.work = replicas_->all_reduce(reduced, {comm::ReduceOp::kSum, {}, site + " replicas"});
    }
    return;
  }
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
    bucket.work = comm_->reduce_scatter(out, payload, {comm::ReduceOp::kSum, {}, site});
  } else {
    bucket.work = comm_->all_reduce(payload, {comm::ReduceOp::kSum, {}, site});
  }
}

// Note [Quantized gradient reduction]: ZeRO++'s qgZ. The reduction group is D nodes x H ranks
// (data_inner fastest), rank d*H + j owning chunk P_(d*H+j) of the bucket. (1) Within the node,
// rank (d, j) sends rank (d, j') the D chunks {P_(d'*H+j')} as one message of 4-bit blocks
// (comm::kGradientBlock), and sums what it receives: the node's partial sums of the D chunks that
// end on its column j. (2) Across nodes, it sends rank (d', j) its partial of P_(d'*H+j), again as
// 4-bit blocks, and sums the D partials of its own chunk. Each message is quantized once per hop,
// so what crosses nodes is an eighth of fp32's bytes (plus one scale per block); received messages
// are summed in rank order, so the result is the same on every run. With H = 1 (no data_inner
// axis) step 1 is skipped and step 2 is the whole reduction; with D = 1, step 2. Without LoCo there
// is no error feedback (as DeepSpeed's qgZ). Synchronous: it runs on the caller's thread. As
// DeepSpeed's, only gradients of two or more dimensions are quantized: a bucket of 1-D parameters
// (biases, norms' gains: few elements, and sensitive) is reduce-scattered exactly.
//
// Note [LoCo error feedback]: with zeropp_loco_param each hop's messages carry error feedback
// (kernels/cpu/quantize.h): a message quantizes c = x + e, and e becomes
// err_beta * e + (1 - err_beta) * (c - what was sent), e being this rank's error for that message
// from the bucket's previous reduction. Each rank keeps, per bucket, one error per hop (the D * H
// chunks it sends within the node, the D partials it sends across), stored between reductions as
// 8-bit blocks of comm::kGradientBlock (a quarter of fp32's memory, as DeepSpeed stores them); every
// reset_T-th reduction (counting every backward, from the first) starts from zero. The errors and
// the count go into checkpoints (Engine::save_unit) and come back when the checkpoint is loaded on
// the same layout; on any other, LoCo starts from zero, as after a reset. With MiCS only the first
// replica's errors are saved (each replica's differ); the other replicas restart theirs from zero.
at::Tensor GradReducer::quantized_reduce_scatter(const at::Tensor& input, int64_t chunk, size_t bucket) {
  const int64_t h = qgz_intra_ ? qgz_intra_->size() : 1, d = qgz_inter_->size();
  at::Tensor rows = input.to(at::kFloat).view({d, h, chunk});
  // Rows of `rows2d` quantized one by one (with LoCo, carrying the errors in `stored`), exchanged
  // over `group` (row k to rank k), dequantized and summed in rank order.
  auto exchange = [this](const comm::CommunicatorPtr& group, const at::Tensor& rows2d, comm::Quantized& stored) {
    const int64_t n = rows2d.size(0), len = rows2d.size(1);
    const int64_t row_bytes = comm::quantized_wire_bytes(len, 4, comm::kGradientBlock);
    at::Tensor error;
    if (loco()) {
      error = at::zeros({n * len}, rows2d.options());
      if (stored.q.defined()) comm::dequantize(stored, error);
    }
    at::Tensor send = at::empty({n * row_bytes}, rows2d.options().dtype(at::kByte));
    for (int64_t k = 0; k < n; ++k) {
      at::Tensor row_error = loco() ? error.slice(0, k * len, (k + 1) * len) : at::Tensor();
      comm::pack_message(comm::quantize(rows2d[k], 4, comm::kGradientBlock, loco() ? &row_error : nullptr, loco_beta_),
                         send.slice(0, k * row_bytes, (k + 1) * row_bytes));
    }
    if (loco()) stored = comm::quantize(error, 8, comm::kGradientBlock);
    at::Tensor recv = at::empty_like(send);
    group->all_to_all(recv, send, {})->wait();
    at::Tensor sum = at::zeros({len}, rows2d.options());
    for (int64_t k = 0; k < n; ++k)
      comm::dequantize(comm::view_message(recv.slice(0, k * row_bytes, (k + 1) * row_bytes), len, 4,
                                          comm::kGradientBlock),
                       sum, /*accumulate=*/true);
    return sum;
  };
  LocoErrors unused;  // LoCo off: exchange never touches it
  LocoErrors& errors = loco() ? loco_errors_.at(bucket) : unused;
  // (1) within the node: row j' holds the chunks of column j', [D * chunk]
  at::Tensor partial = h > 1 ? exchange(qgz_intra_, rows.transpose(0, 1).reshape({h, d * chunk}), errors.intra)
                             : rows.reshape({d * chunk});
  // (2) across nodes: row d' is the partial of P_(d'*H+j)
  return d > 1 ? exchange(qgz_inter_, partial.view({d, chunk}), errors.inter) : partial.view({chunk}).clone();
}

void GradReducer::set_loco(float err_beta, int64_t reset_T) {
  ZEAL_INTERNAL_ASSERT(qgz_inter_ && reset_T > 0, "LoCo needs qgZ and reset_T > 0");
  loco_beta_ = err_beta;
  loco_reset_T_ = reset_T;
  loco_errors_.assign(buckets_.size(), {});
}

void GradReducer::clear_loco() {
  for (LocoErrors& e : loco_errors_) e = {};
}

std::pair<int64_t, int64_t> GradReducer::loco_sizes(const GradBucket& b) const {
  const int64_t h = qgz_intra_ ? qgz_intra_->size() : 1, d = qgz_inter_ ? qgz_inter_->size() : 1;
  const int64_t len = b.end - b.begin;  // D * H chunks
  if (!b.matrix) return {0, 0};          // reduced exactly: no errors
  return {h > 1 ? len : 0, d > 1 ? len / h : 0};
}

GradReducer::LocoState GradReducer::loco_state() const {
  std::vector<at::Tensor> levels, scales;
  auto add = [&](const comm::Quantized& q, int64_t n) {
    if (n == 0) return;
    if (q.q.defined()) {
      levels.push_back(q.q.cpu());
      scales.push_back(q.scales.cpu());
    } else {
      levels.push_back(at::zeros({n}, at::kByte));
      scales.push_back(at::zeros({comm::quantized_scales(n, comm::kGradientBlock)}, at::kFloat));
    }
  };
  for (size_t k = 0; k < buckets_.size(); ++k) {
    auto [intra, inter] = loco_sizes(buckets_[k]);
    add(loco_errors_[k].intra, intra);
    add(loco_errors_[k].inter, inter);
  }
  LocoState out;
  out.levels = levels.empty() ? at::zeros({0}, at::kByte) : at::cat(levels);
  out.scales = scales.empty() ? at::zeros({0}, at::kFloat) : at::cat(scales);
  out.reductions = loco_reductions_;
  return out;
}

bool GradReducer::restore_loco(const LocoState& state) {
  clear_loco();
  if (!state.levels.defined() || !state.scales.defined() || state.levels.scalar_type() != at::kByte ||
      state.scales.scalar_type() != at::kFloat)
    return false;
  const at::Device device = grad_shard_.defined() ? grad_shard_.device() : at::Device(at::kCPU);
  int64_t at_level = 0, at_scale = 0;
  bool fits = true;  // every error's levels and scales lie within the saved tensors
  auto take = [&](comm::Quantized& q, int64_t n) {
    if (n == 0 || !fits) return;
    const int64_t blocks = comm::quantized_scales(n, comm::kGradientBlock);
    if (at_level + n > state.levels.numel() || at_scale + blocks > state.scales.numel()) {
      fits = false;
      return;
    }
    q = comm::Quantized{state.levels.slice(0, at_level, at_level + n).to(device).clone(),
                        state.scales.slice(0, at_scale, at_scale + blocks).to(device).clone(), n,
                        comm::kGradientBlock, 8};
    at_level += n;
    at_scale += blocks;
  };
  for (size_t k = 0; k < buckets_.size(); ++k) {
    auto [intra, inter] = loco_sizes(buckets_[k]);
    take(loco_errors_[k].intra, intra);
    take(loco_errors_[k].inter, inter);
  }
  if (!fits || at_level != state.levels.numel() || at_scale != state.scales.numel()) {  // saved for another layout
    clear_loco();
    return false;
  }
  loco_reductions_ = state.reductions;
  return true;
}

void GradReducer::retire(GradBucket& b) {
  if (b.retired) return;
  if (b.work) b.work->wait();
  at::Tensor reduced = comm_->size() == 1 ? b.comm_buffer : b.comm_output;
  int64_t chunk = (b.end - b.begin) / comm_->size();
  at::Tensor out = grad_shard_.slice(0, b.shard_begin, b.shard_begin + chunk);
  out.add_(reduced, post_factor_);  // accumulation over micro-batches happens here
  b.comm_buffer.reset();
  b.comm_output.reset();
  b.work.reset();
  b.retired = true;
  if (boundary_ && bucket_final_) bucket_final_(b.begin, b.end, b.shard_begin, b.shard_begin + chunk);
}

void GradReducer::finish() {
  if (!reducing_) {
    // One rank: nothing to sum, but an expert's gradient still covers the other expert ranks'
    // samples (Note [Expert gradients]).
    if (boundary_ && flat_grads_.defined() && comm_->size() == 1 && post_factor_ != 1.0) flat_grads_.mul_(post_factor_);
    // One rank (stage 2 via all-reduce): its shard is the whole, unreduced gradient buffer.
    if (grad_shard_.defined() && flat_grads_.defined() && comm_->size() == 1) grad_shard_.copy_(flat_grads_);
    return;
  }
  // Parameters that took no part in this backward never fired their hook: release them now.
  for (auto& b : buckets_) b.pending = 0;
  launch_ready_buckets();
  for (auto& b : buckets_) {
    if (partitioned_) {
      retire(b);
      continue;
    }
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
    if (bucket_final_) {
      const int64_t chunk = (b.end - b.begin) / comm_->size();
      bucket_final_(b.begin, b.end, b.shard_begin, b.shard_begin + chunk);
    }
  }
  reducing_ = false;
}

}  // namespace zeal::engine
