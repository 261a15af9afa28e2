#include "zeal/zero/layout.h"

#include <algorithm>

#include "zeal/core/error.h"

namespace zeal::zero {

FlatLayout make_flat_layout(const std::vector<int64_t>& numels, int64_t bucket_size, int world) {
  ZEAL_CHECK(world >= 1, "data-parallel size must be >= 1, got ", world);
  ZEAL_CHECK(bucket_size >= 1, "reduce_bucket_size must be >= 1, got ", bucket_size);
  FlatLayout layout;
  layout.world = world;
  layout.numels = numels;
  layout.offsets.assign(numels.size(), 0);
  auto close = [&](Bucket& b) {
    b.data_end = layout.total;
    int64_t size = b.data_end - b.begin;
    layout.total = b.begin + (size + world - 1) / world * world;
    b.end = layout.total;
  };
  for (size_t k = numels.size(); k-- > 0;) {
    if (layout.buckets.empty() || layout.buckets.back().end != 0) {
      Bucket b;
      b.begin = layout.total;
      layout.buckets.push_back(b);
    }
    Bucket& b = layout.buckets.back();
    layout.offsets[k] = layout.total;
    layout.total += numels[k];
    b.params.push_back(k);
    if (layout.total - b.begin >= bucket_size) close(b);
  }
  if (!layout.buckets.empty() && layout.buckets.back().end == 0) close(layout.buckets.back());
  return layout;
}

std::vector<OwnedRange> FlatLayout::owned(int rank, bool partitioned) const {
  ZEAL_CHECK(rank >= 0 && rank < world, "rank ", rank, " is outside a data-parallel group of ", world);
  if (!partitioned) return {OwnedRange{0, total, 0}};
  std::vector<OwnedRange> out;
  int64_t local = 0;
  for (const Bucket& b : buckets) {
    int64_t c = b.chunk(world);
    if (c == 0) continue;
    out.push_back({b.begin + rank * c, b.begin + (rank + 1) * c, local});
    local += c;
  }
  return out;
}

int64_t FlatLayout::shard_size(bool partitioned) const {
  if (!partitioned) return total;
  int64_t n = 0;
  for (const Bucket& b : buckets) n += b.chunk(world);
  return n;
}

std::vector<LocalRange> to_local(const std::vector<OwnedRange>& owned, int64_t flat_begin, int64_t flat_end) {
  std::vector<LocalRange> out;
  for (const OwnedPiece& p : owned_pieces_flat(owned, flat_begin, flat_end))
    out.push_back({p.local_begin, p.local_begin + p.size});
  return out;
}

std::vector<OwnedPiece> owned_pieces_flat(const std::vector<OwnedRange>& owned, int64_t flat_begin, int64_t flat_end) {
  std::vector<OwnedPiece> out;
  for (const OwnedRange& o : owned) {
    int64_t lo = std::max(o.flat_begin, flat_begin), hi = std::min(o.flat_end, flat_end);
    if (lo < hi) out.push_back({lo, o.local_begin + (lo - o.flat_begin), hi - lo});
  }
  return out;
}

std::vector<OwnedPiece> owned_pieces_local(const std::vector<OwnedRange>& owned, int64_t local_begin,
                                           int64_t local_end) {
  std::vector<OwnedPiece> out;
  for (const OwnedRange& o : owned) {
    const int64_t o_end = o.local_begin + (o.flat_end - o.flat_begin);
    int64_t lo = std::max(o.local_begin, local_begin), hi = std::min(o_end, local_end);
    if (lo < hi) out.push_back({o.flat_begin + (lo - o.local_begin), lo, hi - lo});
  }
  return out;
}

std::vector<Fragment> fragments(const FlatLayout& layout, const std::vector<OwnedRange>& owned) {
  std::vector<Fragment> out;
  for (const OwnedRange& o : owned) {
    for (size_t p = 0; p < layout.numels.size(); ++p) {
      int64_t lo = std::max(o.flat_begin, layout.offsets[p]);
      int64_t hi = std::min(o.flat_end, layout.offsets[p] + layout.numels[p]);
      if (lo >= hi) continue;
      out.push_back({static_cast<int64_t>(p), lo - layout.offsets[p], hi - layout.offsets[p],
                     o.local_begin + (lo - o.flat_begin)});
    }
  }
  return out;
}

}  // namespace zeal::zero
