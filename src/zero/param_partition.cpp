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
                               int64_t persistence_threshold, const ParamOffload& offload, FrozenParams frozen)
    : params_(std::move(params)),
      shapes_(std::move(shapes)),
      shard_(std::move(shard)),
      quantized_(offload.quantized_weights),
      hpz_intra_(offload.hpz_intra),
      hpz_inter_(offload.hpz_inter),
      comm_(std::move(comm)) {
  options_ = shard_.options();
  if (offload.host_shard && !shard_.device().is_cpu()) shard_ = shard_.to(at::kCPU);
  trainable_ = params_.size();
  ZEAL_INTERNAL_ASSERT(shapes_.size() == trainable_ && layout.numels.size() == trainable_, "one shape per parameter");
  ZEAL_INTERNAL_ASSERT(frozen.shapes.size() == frozen.params.size() && frozen.chunks.size() == frozen.params.size(),
                       "one shape and chunk per frozen parameter");
  numel_ = layout.numels;
  chunk_begin_.assign(trainable_, 0);
  chunk_size_.assign(trainable_, 0);
  for (size_t k = 0; k < frozen.params.size(); ++k) {  // Note [Frozen parameters]
    params_.push_back(frozen.params[k]);
    shapes_.push_back(frozen.shapes[k]);
    numel_.push_back(c10::multiply_integers(frozen.shapes[k]));
    chunk_begin_.push_back(0);
    chunk_size_.push_back(frozen.chunks[k].numel());
    ZEAL_INTERNAL_ASSERT(chunk_size_.back() * comm_->size() >= numel_.back(), "frozen chunk of ", chunk_size_.back(),
                         " elements for ", numel_.back());
  }
  const size_t n = params_.size();
  persistent_.assign(n, 0);
  state_.assign(n, State::kReleased);
  full_.resize(n);
  work_.resize(n);
  staging_.resize(n);
  wire_.resize(n);
  hpz_gathered_.resize(n);
  read_handle_.resize(n);
  if (hpz_intra_) {
    ZEAL_INTERNAL_ASSERT(offload.nvme_path.empty(), "hpZ with an NVMe swap (the config refuses it)");
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
  for (size_t i = 0; i < n; ++i) persistent_[i] = numel_[i] <= persistence_threshold;
  own_chunk_.resize(n);
  stored_.resize(n);
  frozen_secondary_.resize(n);
  ZEAL_INTERNAL_ASSERT(!frozen.quantized || offload.nvme_path.empty(),
                       "quantized frozen weights with an NVMe swap (the config refuses it)");
  for (size_t i = trainable_; i < n; ++i) {
    at::Tensor chunk = frozen.chunks[i - trainable_].reshape({-1}).to(options_);
    if (frozen.quantized && !persistent_[i] && chunk_size_[i] > 0) {
      stored_[i] = weight_message(i, chunk);
      if (offload.host_shard) stored_[i] = stored_[i].to(at::kCPU);
    } else {
      own_chunk_[i] = offload.host_shard ? chunk.to(at::kCPU) : chunk;
    }
  }
  if (!offload.nvme_path.empty()) {
    // Every chunk goes to the swap file once; the in-memory shard is dropped.
    swap_ = std::make_unique<offload::ParamSwapper>(offload.nvme_path, offload.aio, shard_.scalar_type(), chunk_size_);
    for (size_t i = 0; i < n; ++i)
      if (chunk_size_[i] > 0) swap_->write(i, chunk_values(i));
    shard_ = at::empty({0}, shard_.options());
    for (auto& c : own_chunk_) c.reset();
  }
  for (size_t i = 0; i < n; ++i) {
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
    if (frozen(i)) {
      if (frozen_secondary_stale_) build_frozen_secondary();
      staging_[i] = frozen_secondary_[i].to(options_.device());
    } else {
      if (secondary_stale_) build_secondary();
      const int64_t begin = chunk_begin_[i];
      staging_[i] = secondary_.slice(1, begin, begin + c).to(options_.device(), /*non_blocking=*/false,
                                                              /*copy=*/false).contiguous();
    }
    // A stored-quantized frozen copy holds messages (Note [Frozen parameters]): bytes, D per rank.
    hpz_gathered_[i] = stored_[i].defined() ? at::empty({staging_[i].numel() * hpz_intra_->size()}, staging_[i].options())
                                            : at::empty({c * comm_->size()}, options_);
    work_[i] = hpz_intra_->all_gather(hpz_gathered_[i], staging_[i], {});
    return;
  }
  // This rank's chunk (or its stored message), from host memory to the device or in place.
  staging_[i] = stored_[i].defined() ? stored_[i] : chunk_values(i);
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
  if (stored_[i].defined()) {  // Note [Frozen parameters]: the stored message goes as it is
    staging_[i] = mine;
    wire_[i] = comm_->size() == 1 ? mine : at::empty({wire_bytes(i) * comm_->size()}, mine.options());
    if (comm_->size() > 1) work_[i] = comm_->all_gather(wire_[i], mine, {});
  } else if (comm_->size() == 1) {
    full_[i].copy_(mine);
    staging_[i].reset();
  } else if (quantized_ && !persistent_[i]) {  // Note [Quantized gathers]
    at::Tensor message = weight_message(i, mine);
    staging_[i] = message;
    wire_[i] = at::empty({wire_bytes(i) * comm_->size()}, message.options());
    work_[i] = comm_->all_gather(wire_[i], message, {});
  } else {
    staging_[i] = mine;
    work_[i] = comm_->all_gather(full_[i], mine, {});
  }
}

void ParamPartition::build_secondary() {
  // The copy lives where the shard does: in host memory with offload_param device cpu (the
  // gathers move each chunk to the device, as they move the shard's).
  secondary_ = at::empty({hpz_inter_->size(), shard_numel_}, shard_.options());
  if (!quantized_) {
    const at::Device device = options_.device();
    at::Tensor from = shard_.to(device);
    at::Tensor into = secondary_.device() == device ? secondary_ : at::empty(secondary_.sizes(), options_);
    hpz_inter_->all_gather(into, from, {})->wait();
    if (!into.is_same(secondary_)) secondary_.copy_(into);
    secondary_stale_ = false;
    return;
  }
  // With qwZ the copy crosses nodes as Note [Quantized gathers]' messages, one per parameter chunk,
  // back to back: every rank then computes with the values qwZ alone would give it.
  std::vector<int64_t> offset(trainable_ + 1, 0);
  for (size_t i = 0; i < trainable_; ++i) offset[i + 1] = offset[i] + (chunk_size_[i] > 0 ? wire_bytes(i) : 0);
  at::Tensor message = at::empty({offset.back()}, options_.dtype(at::kByte));
  for (size_t i = 0; i < trainable_; ++i) {
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
    for (size_t i = 0; i < trainable_; ++i) {
      const int64_t c = chunk_size_[i];
      if (c == 0) continue;
      at::Tensor out = values.slice(0, chunk_begin_[i], chunk_begin_[i] + c);
      comm::dequantize(comm::view_message(from.slice(0, offset[i], offset[i + 1]), c, 8, comm::kWeightBlock), out);
    }
    secondary_[r].copy_(values);
  }
  secondary_stale_ = false;
}

void ParamPartition::build_frozen_secondary() {
  // Note [Frozen parameters]: one all_gather over hpz_inter of every non-persistent frozen chunk,
  // back to back; as messages when they are stored quantized or qwZ is on (what their gathers
  // would carry), else as values.
  const bool messages = quantized_ || std::any_of(stored_.begin(), stored_.end(), [](const at::Tensor& t) {
                          return t.defined();
                        });
  std::vector<size_t> ids;
  for (size_t i = trainable_; i < params_.size(); ++i)
    if (chunk_size_[i] > 0 && !persistent_[i]) ids.push_back(i);
  std::vector<int64_t> offset(ids.size() + 1, 0);
  for (size_t k = 0; k < ids.size(); ++k) offset[k + 1] = offset[k] + (messages ? wire_bytes(ids[k]) : chunk_size_[ids[k]]);
  at::Tensor mine = at::empty({offset.back()}, messages ? options_.dtype(at::kByte) : options_);
  for (size_t k = 0; k < ids.size(); ++k) {
    const size_t i = ids[k];
    at::Tensor out = mine.slice(0, offset[k], offset[k + 1]);
    if (stored_[i].defined())
      out.copy_(stored_[i]);
    else if (messages)
      comm::pack_message(comm::quantize(own_chunk_[i], 8, comm::kWeightBlock), out);
    else
      out.copy_(own_chunk_[i]);
  }
  const int d = hpz_inter_->size();
  const int64_t total = offset.back();
  at::Tensor all = at::empty({d * total}, mine.options());
  hpz_inter_->all_gather(all, mine, {})->wait();
  for (size_t k = 0; k < ids.size(); ++k) {
    const size_t i = ids[k];
    const int64_t c = chunk_size_[i];
    if (stored_[i].defined()) {  // kept as the D ranks' stored messages, where the shard lives
      frozen_secondary_[i] = at::empty({d, offset[k + 1] - offset[k]}, stored_[i].options());
      for (int r = 0; r < d; ++r)
        frozen_secondary_[i][r].copy_(all.slice(0, r * total + offset[k], r * total + offset[k + 1]));
      continue;
    }
    frozen_secondary_[i] = at::empty({d, c}, options_.device(shard_.device()));  // where the shard lives
    at::Tensor values = at::empty({c}, options_.dtype(at::kFloat));
    for (int r = 0; r < d; ++r) {
      at::Tensor from = all.slice(0, r * total + offset[k], r * total + offset[k + 1]);
      if (!messages) {
        frozen_secondary_[i][r].copy_(from);
        continue;
      }
      comm::dequantize(comm::view_message(from, c, 8, comm::kWeightBlock), values);
      frozen_secondary_[i][r].copy_(values);
    }
  }
  frozen_secondary_stale_ = false;
}

at::Tensor ParamPartition::chunk_values(size_t i) const {
  if (frozen(i)) return own_chunk_[i];
  return shard_.slice(0, chunk_begin_[i], chunk_begin_[i] + chunk_size_[i]);
}

int64_t ParamPartition::frozen_bytes() const {
  int64_t bytes = 0;
  for (size_t i = trainable_; i < params_.size(); ++i) {
    if (stored_[i].defined()) bytes += stored_[i].nbytes();
    if (own_chunk_[i].defined()) bytes += own_chunk_[i].nbytes();
    if (frozen_secondary_[i].defined()) bytes += frozen_secondary_[i].nbytes();
  }
  return bytes;
}

at::Tensor ParamPartition::weight_message(size_t i, const at::Tensor& chunk) const {
  at::Tensor message = at::empty({wire_bytes(i)}, chunk.options().dtype(at::kByte));
  comm::pack_message(comm::quantize(chunk, 8, comm::kWeightBlock), message);
  return message;
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
    const int64_t h = hpz_intra_->size(), d = hpz_inter_->size();
    if (stored_[i].defined()) {  // messages, [H][D][bytes]: in rank order they are the gather's wire_
      wire_[i] = hpz_gathered_[i].view({h, d, wire_bytes(i)}).transpose(0, 1).contiguous().view({-1});
    } else {
      const int64_t c = chunk_size_[i];
      full_[i].view({d, h, c}).copy_(hpz_gathered_[i].view({h, d, c}).transpose(0, 1));
    }
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
  for (size_t i = 0; i < trainable_; ++i) {
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
  for (size_t i = 0; i < trainable_; ++i) {
    const int64_t lo = std::max(begin, chunk_begin_[i]), hi = std::min(end, chunk_begin_[i] + chunk_size_[i]);
    if (lo >= hi) continue;
    out.slice(0, lo - begin, hi - begin).copy_(swap_->read(i).slice(0, lo - chunk_begin_[i], hi - chunk_begin_[i]));
  }
  return out;
}

void ParamPartition::refresh() {
  secondary_stale_ = true;  // the caller changed the shard
  // Persistent parameters (and any the caller holds gathered) take the new values; frozen ones
  // have none.
  std::vector<size_t> refresh;
  for (size_t i = 0; i < trainable_; ++i) {
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
  if (frozen(i)) {  // Note [Frozen parameters]
    ZEAL_INTERNAL_ASSERT(!master, "a frozen parameter has no master weights");
    frozen_secondary_stale_ = true;
    if (stored_[i].defined()) {
      stored_[i].copy_(weight_message(i, mine.contiguous()));
    } else if (swap_) {
      swap_->write(i, mine);
    } else {
      own_chunk_[i].copy_(mine);
    }
    return;
  }
  write_shard(chunk_begin_[i], mine);
  if (master) master->slice(0, chunk_begin_[i], chunk_begin_[i] + c).copy_(mine);
}

}  // namespace zeal::zero
