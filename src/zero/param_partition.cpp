#include "zeal/zero/param_partition.h"

#include <algorithm>
#include <tuple>

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include "zeal/comm/quantized.h"
#include "zeal/core/error.h"
#include "zeal/core/logging.h"

namespace zeal::zero {

ParamPartition::ParamPartition(std::vector<at::Tensor> params, std::vector<std::vector<int64_t>> shapes,
                               const FlatLayout& layout, at::Tensor shard, comm::CommunicatorPtr comm,
                               int64_t persistence_threshold, const ParamOffload& offload)
    : params_(std::move(params)),
      shapes_(std::move(shapes)),
      shard_(std::move(shard)),
      quantized_(offload.quantized_weights),
      hpz_intra_(offload.hpz_intra),
      hpz_inter_(offload.hpz_inter),
      comm_(std::move(comm)) {
  options_ = shard_.options();
  if (offload.host_shard && !shard_.device().is_cpu()) shard_ = shard_.to(at::kCPU);
  const size_t n = params_.size();
  ZEAL_INTERNAL_ASSERT(shapes_.size() == n && layout.numels.size() == n, "one shape per parameter");
  numel_ = layout.numels;
  chunk_begin_.assign(n, 0);
  chunk_size_.assign(n, 0);
  persistent_.assign(n, 0);
  state_.assign(n, State::kReleased);
  full_.resize(n);
  work_.resize(n);
  staging_.resize(n);
  wire_.resize(n);
  hpz_gathered_.resize(n);
  read_handle_.resize(n);
  if (hpz_intra_) {
    ZEAL_CHECK(!offload.host_shard && offload.nvme_path.empty(),
               "ZeRO++ hpZ (zero_hpz_partition_size) with offload_param is not supported yet");
    ZEAL_INTERNAL_ASSERT(hpz_inter_ && hpz_intra_->size() * hpz_inter_->size() == comm_->size(),
                         "hpZ groups of ", hpz_intra_->size(), " x ", hpz_inter_->size(), " for ", comm_->size(), " ranks");
  }
  empty_ = at::empty({0}, options_);
  int64_t local = 0;
  for (const Bucket& b : layout.buckets) {
    int64_t c = b.chunk(layout.world);
    for (size_t p : b.params) {
      ZEAL_INTERNAL_ASSERT(numel_[p] == 0 || b.params.size() == 1 || numel_[p] == b.data_end - b.begin,
                           "stage 3 needs one parameter per bucket");
      if (numel_[p] == 0) continue;
      chunk_begin_[p] = local;
      chunk_size_[p] = c;
    }
    local += c;
  }
  ZEAL_INTERNAL_ASSERT(local == shard_.numel(), "shard of ", shard_.numel(), " elements for a layout of ", local);
  shard_numel_ = local;
  if (!offload.nvme_path.empty()) {
    // Every chunk goes to the swap file once; the in-memory shard is dropped.
    swap_ = std::make_unique<offload::ParamSwapper>(offload.nvme_path, offload.aio, shard_.scalar_type(), chunk_size_);
    for (size_t i = 0; i < n; ++i)
      if (chunk_size_[i] > 0) swap_->write(i, shard_.slice(0, chunk_begin_[i], chunk_begin_[i] + chunk_size_[i]));
    shard_ = at::empty({0}, shard_.options());
  }
  for (size_t i = 0; i < n; ++i) {
    persistent_[i] = numel_[i] <= persistence_threshold;
    if (persistent_[i]) {
      fetch(i);
    } else {
      params_[i].set_data(empty_);
    }
  }
  for (size_t i = 0; i < n; ++i)
    if (persistent_[i]) make_live(i);
}

ParamPartition::~ParamPartition() {
  for (auto& h : read_handle_) {  // reads still filling buffers; no collective is issued here
    if (!h) continue;
    try {
      h->wait();
    } catch (...) {
    }
  }
  for (auto& w : work_) {
    if (w && !w->is_completed()) {
      try {
        w->wait();
      } catch (...) {
      }
    }
  }
}

namespace {
constexpr int64_t kEndToken = -1;
int64_t token_of(const std::vector<size_t>& indices) {  // FNV-1a over the indices
  uint64_t h = 1469598103934665603ull;
  for (size_t i : indices) {
    h ^= static_cast<uint64_t>(i) + 1;
    h *= 1099511628211ull;
  }
  return static_cast<int64_t>(h & 0x7fffffffffffffffull);
}
}  // namespace

bool ParamPartition::agree(int64_t token) {
  if (comm_->size() == 1) return true;
  auto options = at::TensorOptions().dtype(at::kLong).device(options_.device());
  at::Tensor mine = at::full({1}, token, options);
  at::Tensor all = at::empty({comm_->size()}, options);
  comm_->all_gather(all, mine, {})->wait();
  return all.eq(token).all().item<bool>();
}

void ParamPartition::gather_everything() {
  static bool warned = false;
  log("zero", warned ? LogLevel::kDebug : LogLevel::kWarn,
      "ZeRO-3: ranks asked for different parameters (different branches of the model?); gathering every "
      "parameter until the end of this backward");
  warned = true;
  for (size_t i = 0; i < params_.size(); ++i) fetch(i);
  for (size_t i = 0; i < params_.size(); ++i) make_live(i);
  fallback_ = fallback_this_step_ = true;
}

void ParamPartition::fetch_checked(const std::vector<size_t>& indices) {
  if (fallback_) return;
  std::vector<size_t> needed;
  for (size_t i : indices)
    if (!persistent_[i] && state_[i] != State::kLive) needed.push_back(i);
  // Persistent and already-live parameters need no collective: their state is the same on every
  // rank whenever the ranks have agreed so far.
  if (!needed.empty() && !agree(token_of(needed))) {
    gather_everything();
    return;
  }
  for (size_t i : needed) fetch(i);
  for (size_t i : indices) make_live(i);
}

void ParamPartition::end_forward() {
  if (!fallback_ && !agree(kEndToken)) gather_everything();
  if (fallback_) return;
  release_all();
}

void ParamPartition::end_backward() {
  if (!fallback_ && !agree(kEndToken)) gather_everything();
  fallback_ = false;
  release_all();
}

void ParamPartition::fetch(size_t i) {
  if (state_[i] == State::kLive || state_[i] == State::kGathering) return;
  const int64_t c = chunk_size_[i];
  full_[i] = at::empty({c * comm_->size()}, options_);
  state_[i] = State::kGathering;
  live_elements_ += full_[i].numel();
  peak_live_elements_ = std::max(peak_live_elements_, live_elements_);
  work_[i].reset();
  if (swap_) {  // Note [Swapped chunk read-ahead]
    std::tie(staging_[i], read_handle_[i]) = swap_->start_read(i);
    read_queue_.push_back(i);
    while (read_queue_.size() > kReadAhead) issue_front();
    return;
  }
  if (hpz_intra_ && !persistent_[i]) {  // Note [Secondary partition]
    if (secondary_stale_) build_secondary();
    const int64_t begin = chunk_begin_[i];
    staging_[i] = secondary_.slice(1, begin, begin + c).contiguous();
    hpz_gathered_[i] = at::empty({c * comm_->size()}, options_);
    work_[i] = hpz_intra_->all_gather(hpz_gathered_[i], staging_[i], {});
    return;
  }
  // This rank's chunk, from host memory to the device or in place.
  staging_[i] = shard_.slice(0, chunk_begin_[i], chunk_begin_[i] + c);
  read_queue_.push_back(i);
  issue_front();
}

void ParamPartition::issue_front() {
  const size_t i = read_queue_.front();
  read_queue_.pop_front();
  if (read_handle_[i]) {
    offload::IoHandle handle = std::move(read_handle_[i]);
    swap_->finish_read(i, handle);
  }
  at::Tensor mine = staging_[i];
  if (mine.device() != full_[i].device()) mine = mine.to(full_[i].device());
  if (comm_->size() == 1) {
    full_[i].copy_(mine);
    staging_[i].reset();
  } else if (quantized_ && !persistent_[i]) {  // Note [Quantized gathers]
    comm::Quantized q = comm::quantize(mine, 8, comm::kWeightBlock);
    at::Tensor message = at::empty({wire_bytes(i)}, q.q.options());
    comm::pack_message(q, message);
    staging_[i] = message;
    wire_[i] = at::empty({wire_bytes(i) * comm_->size()}, q.q.options());
    work_[i] = comm_->all_gather(wire_[i], message, {});
  } else {
    staging_[i] = mine;
    work_[i] = comm_->all_gather(full_[i], mine, {});
  }
}

void ParamPartition::build_secondary() {
  secondary_ = at::empty({hpz_inter_->size(), shard_numel_}, options_);
  if (!quantized_) {
    hpz_inter_->all_gather(secondary_, shard_, {})->wait();
    secondary_stale_ = false;
    return;
  }
  // With qwZ the copy crosses nodes as Note [Quantized gathers]' messages, one per parameter chunk,
  // back to back: every rank then computes with the values qwZ alone would give it.
  std::vector<int64_t> offset(params_.size() + 1, 0);
  for (size_t i = 0; i < params_.size(); ++i) offset[i + 1] = offset[i] + (chunk_size_[i] > 0 ? wire_bytes(i) : 0);
  at::Tensor message = at::empty({offset.back()}, options_.dtype(at::kByte));
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t c = chunk_size_[i];
    if (c == 0) continue;
    comm::pack_message(comm::quantize(shard_.slice(0, chunk_begin_[i], chunk_begin_[i] + c), 8, comm::kWeightBlock),
                       message.slice(0, offset[i], offset[i + 1]));
  }
  const int d = hpz_inter_->size();
  at::Tensor all = at::empty({d * offset.back()}, message.options());
  hpz_inter_->all_gather(all, message, {})->wait();
  at::Tensor values = at::empty({shard_numel_}, options_.dtype(at::kFloat));
  for (int r = 0; r < d; ++r) {
    at::Tensor from = all.slice(0, r * offset.back(), (r + 1) * offset.back());
    for (size_t i = 0; i < params_.size(); ++i) {
      const int64_t c = chunk_size_[i];
      if (c == 0) continue;
      at::Tensor out = values.slice(0, chunk_begin_[i], chunk_begin_[i] + c);
      comm::dequantize(comm::view_message(from.slice(0, offset[i], offset[i + 1]), c, 8, comm::kWeightBlock), out);
    }
    secondary_[r].copy_(values);
  }
  secondary_stale_ = false;
}

int64_t ParamPartition::wire_bytes(size_t i) const {
  return comm::quantized_wire_bytes(chunk_size_[i], 8, comm::kWeightBlock);
}

void ParamPartition::issue_queued(size_t until) {
  if (std::find(read_queue_.begin(), read_queue_.end(), until) == read_queue_.end()) return;
  for (;;) {
    const size_t front = read_queue_.front();
    issue_front();
    if (front == until) return;
  }
}

void ParamPartition::wait(size_t i) {
  if (state_[i] == State::kLive) return;
  fetch(i);
  make_live(i);
}

void ParamPartition::make_live(size_t i) {
  if (state_[i] == State::kLive) return;
  issue_queued(i);
  if (work_[i]) work_[i]->wait();
  work_[i].reset();
  staging_[i].reset();
  if (hpz_gathered_[i].defined()) {  // Note [Secondary partition]: [H][D][c] -> [D][H][c]
    const int64_t c = chunk_size_[i], h = hpz_intra_->size(), d = hpz_inter_->size();
    full_[i].view({d, h, c}).copy_(hpz_gathered_[i].view({h, d, c}).transpose(0, 1));
    hpz_gathered_[i].reset();
  }
  if (wire_[i].defined()) {  // Note [Quantized gathers]: each rank's chunk from its message
    const int64_t c = chunk_size_[i], bytes = wire_bytes(i);
    const bool fp32 = options_.dtype() == at::kFloat;
    at::Tensor values = fp32 ? full_[i] : at::empty({full_[i].numel()}, options_.dtype(at::kFloat));
    for (int r = 0; r < comm_->size(); ++r) {
      at::Tensor out = values.slice(0, r * c, (r + 1) * c);
      comm::dequantize(comm::view_message(wire_[i].slice(0, r * bytes, (r + 1) * bytes), c, 8, comm::kWeightBlock), out);
    }
    if (!fp32) full_[i].copy_(values);
    wire_[i].reset();
  }
  params_[i].set_data(full_[i].slice(0, 0, numel_[i]).view(shapes_[i]));
  live_storage_[full_[i].storage().data()] = i;
  state_[i] = State::kLive;
}

void ParamPartition::release(size_t i) {
  if (persistent_[i] || fallback_ || state_[i] == State::kReleased) return;
  if (state_[i] == State::kGathering) issue_queued(i);  // its read done and its gather issued, as on every rank
  if (state_[i] == State::kGathering && work_[i]) work_[i]->wait();  // never free a buffer MPI is writing
  work_[i].reset();
  staging_[i].reset();
  wire_[i].reset();
  hpz_gathered_[i].reset();
  if (state_[i] == State::kLive) live_storage_.erase(full_[i].storage().data());
  if (state_[i] != State::kShapeOnly) live_elements_ -= full_[i].numel();
  params_[i].set_data(empty_);
  full_[i].reset();
  state_[i] = State::kReleased;
}

void ParamPartition::release_all() {
  for (size_t i = 0; i < params_.size(); ++i) release(i);
}

void ParamPartition::shape_only(size_t i) {
  if (state_[i] != State::kReleased) return;
  params_[i].set_data(at::empty(shapes_[i], options_));
  state_[i] = State::kShapeOnly;
}

int64_t ParamPartition::index_of_storage(const void* data) const {
  auto it = live_storage_.find(data);
  return it == live_storage_.end() ? -1 : static_cast<int64_t>(it->second);
}

void ParamPartition::publish(const at::Tensor& master) {
  write_shard(0, master);
  refresh();
}

void ParamPartition::write_shard(int64_t begin, const at::Tensor& values) {
  const int64_t end = begin + values.numel();
  secondary_stale_ = true;
  if (!swap_) {
    shard_.slice(0, begin, end).copy_(values);
    return;
  }
  // Whole chunks are written as they are; a chunk the range covers only in part is read, patched
  // and written (the ends of an optimizer sub-group).
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t lo = std::max(begin, chunk_begin_[i]), hi = std::min(end, chunk_begin_[i] + chunk_size_[i]);
    if (lo >= hi) continue;
    at::Tensor part = values.slice(0, lo - begin, hi - begin);
    if (hi - lo == chunk_size_[i])
      swap_->write(i, part);
    else
      swap_->patch(i, lo - chunk_begin_[i], part);
  }
}

at::Tensor ParamPartition::read_shard(int64_t begin, int64_t end) {
  if (!swap_) return shard_.slice(0, begin, end).to(at::kFloat);
  at::Tensor out = at::empty({end - begin}, at::TensorOptions().dtype(at::kFloat));
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t lo = std::max(begin, chunk_begin_[i]), hi = std::min(end, chunk_begin_[i] + chunk_size_[i]);
    if (lo >= hi) continue;
    out.slice(0, lo - begin, hi - begin).copy_(swap_->read(i).slice(0, lo - chunk_begin_[i], hi - chunk_begin_[i]));
  }
  return out;
}

void ParamPartition::refresh() {
  secondary_stale_ = true;  // the caller changed the shard
  // Persistent parameters (and any the caller holds gathered) take the new values.
  std::vector<size_t> refresh;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (state_[i] == State::kLive || state_[i] == State::kGathering) {
      if (state_[i] == State::kGathering) issue_queued(i);
      if (state_[i] == State::kGathering && work_[i]) work_[i]->wait();
      if (state_[i] == State::kLive) live_storage_.erase(full_[i].storage().data());
      live_elements_ -= full_[i].numel();
      state_[i] = State::kReleased;
      refresh.push_back(i);
    }
  }
  for (size_t i : refresh) fetch(i);
  for (size_t i : refresh) make_live(i);
}

void ParamPartition::absorb(size_t i, at::Tensor* master) {  // master may be null
  ZEAL_CHECK(state_[i] == State::kLive, "parameter ", i, " is not gathered");
  const int64_t c = chunk_size_[i], begin = comm_->rank() * c;
  at::Tensor mine = full_[i].slice(0, begin, begin + c);
  write_shard(chunk_begin_[i], mine);
  if (master) master->slice(0, chunk_begin_[i], chunk_begin_[i] + c).copy_(mine);
}

}  // namespace zeal::zero
