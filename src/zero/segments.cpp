#include "zeal/zero/segments.h"

#include <algorithm>

#include "zeal/core/error.h"

namespace zeal::zero {
namespace {

// Flat [lo, hi) cut where this rank's ownership starts and ends: owned pieces carry both
// coordinates, other ranks' stretches flat ones only (begin == end == 0).
void cut_flat(const std::vector<OwnedRange>& owned, int64_t lo, int64_t hi, const optim::ParamGroup& like,
              size_t group, Segments& out) {
  auto add = [&](int64_t flat_begin, int64_t flat_end, int64_t local_begin, bool mine) {
    optim::ParamGroup segment = like;
    segment.flat_begin = flat_begin;
    segment.flat_end = flat_end;
    segment.begin = mine ? local_begin : 0;
    segment.end = mine ? local_begin + (flat_end - flat_begin) : 0;
    out.flat.push_back(segment);
    out.flat_group_of.push_back(group);
  };
  std::vector<OwnedPiece> pieces = owned_pieces_flat(owned, lo, hi);
  std::sort(pieces.begin(), pieces.end(), [](const OwnedPiece& a, const OwnedPiece& b) { return a.flat_begin < b.flat_begin; });
  int64_t cursor = lo;
  for (const OwnedPiece& piece : pieces) {
    if (piece.flat_begin > cursor) add(cursor, piece.flat_begin, 0, false);
    add(piece.flat_begin, piece.flat_begin + piece.size, piece.local_begin, true);
    cursor = piece.flat_begin + piece.size;
  }
  if (cursor < hi) add(cursor, hi, 0, false);
}

}  // namespace

Segments build_segments(const SegmentSpec& spec) {
  ZEAL_INTERNAL_ASSERT(spec.layout && spec.owned, "build_segments needs the layout and the ownership table");
  const FlatLayout& layout = *spec.layout;
  const std::vector<OwnedRange>& owned = *spec.owned;
  ZEAL_INTERNAL_ASSERT(spec.group_of_param.size() == layout.numels.size(), "group_of_param has ",
                       spec.group_of_param.size(), " entries for ", layout.numels.size(), " parameters");
  Segments out;
  if (spec.per_tensor) {
    // One segment per owned piece of each parameter; a parameter's pieces may sit on several ranks,
    // so the optimizer's per-tensor sums are added across them.
    for (size_t i = 0; i < layout.numels.size(); ++i) {
      const size_t g = spec.group_of_param[i];
      for (const LocalRange& r : to_local(owned, layout.offsets[i], layout.offsets[i] + layout.numels[i])) {
        optim::ParamGroup segment = spec.groups[g];
        segment.begin = r.local_begin;
        segment.end = r.local_end;
        segment.tensor = static_cast<int64_t>(i);
        out.local.push_back(segment);
        out.group_of.push_back(g);
      }
      if (spec.flat_state) {
        optim::ParamGroup like = spec.groups[g];
        like.tensor = static_cast<int64_t>(i);
        cut_flat(owned, layout.offsets[i], layout.offsets[i] + layout.numels[i], like, g, out);
      }
    }
    return out;
  }
  // Each group's parameters occupy one flat range; its pieces in the owned ranges are its segments.
  for (size_t g = 0; g < spec.groups.size(); ++g) {
    int64_t lo = layout.total, hi = 0;
    for (size_t i = 0; i < layout.numels.size(); ++i) {
      if (spec.group_of_param[i] != g) continue;
      lo = std::min(lo, layout.offsets[i]);
      hi = std::max(hi, layout.offsets[i] + layout.numels[i]);
    }
    for (const LocalRange& r : to_local(owned, lo, hi)) {
      optim::ParamGroup segment = spec.groups[g];
      segment.begin = r.local_begin;
      segment.end = r.local_end;
      out.local.push_back(segment);
      out.group_of.push_back(g);
    }
    if (spec.flat_state) cut_flat(owned, lo, hi, spec.groups[g], g, out);
  }
  return out;
}

}  // namespace zeal::zero
