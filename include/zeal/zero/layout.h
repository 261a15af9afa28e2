// The flat layout of a model's trainable parameters and, for ZeRO, each rank's partition of it.
// Pure data and functions: no tensors, no communicator, unit-tested on its own.
//
// Parameters are laid out last to first (the order backward produces their gradients) and cut
// into buckets of about reduce_bucket_size elements. Each bucket is padded with zeros to a
// multiple of the data-parallel size N, so that rank r can own chunk r of every bucket
// (the partition used by ZeRO stages 1 and 2): a bucket's gradients are then reduced with one
// all_reduce (stage 0, 1) or reduce_scatter (stage 2), and its parameters re-assembled with one
// all_gather, each in place over the bucket's contiguous range. A parameter never straddles
// buckets; padding belongs to no parameter and stays zero.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace zeal::zero {

struct Bucket {
  int64_t begin = 0;     // flat range, padded: (end - begin) % world == 0
  int64_t end = 0;
  int64_t data_end = 0;  // end of the last parameter; [data_end, end) is padding
  std::vector<size_t> params;  // parameter indices, in layout order
  int64_t chunk(int world) const { return (end - begin) / world; }
};

// A run of flat elements this rank owns, and where it sits in the rank's local shard buffer.
struct OwnedRange {
  int64_t flat_begin = 0;
  int64_t flat_end = 0;
  int64_t local_begin = 0;
};

struct FlatLayout {
  int world = 1;
  std::vector<int64_t> offsets;  // flat offset of each parameter
  std::vector<int64_t> numels;
  std::vector<Bucket> buckets;   // in reduction order
  int64_t total = 0;             // padded flat size

  // The ranges rank `rank` owns: chunk `rank` of every bucket when `partitioned`, else everything.
  std::vector<OwnedRange> owned(int rank, bool partitioned) const;
  int64_t shard_size(bool partitioned) const;  // elements a rank owns
};

FlatLayout make_flat_layout(const std::vector<int64_t>& numels, int64_t bucket_size, int world);

// Maps flat ranges [begin, end) (for instance an optimizer group's) to the local coordinates of
// the owned ranges: the intersections, in local order.
struct LocalRange {
  int64_t local_begin = 0;
  int64_t local_end = 0;
};
std::vector<LocalRange> to_local(const std::vector<OwnedRange>& owned, int64_t flat_begin, int64_t flat_end);

// The same intersections with both coordinates: `size` elements at flat_begin of the flat buffer
// and at local_begin of this rank's owned elements. The query range is given in flat coordinates
// (owned_pieces_flat) or in local ones (owned_pieces_local); pieces come in local order.
struct OwnedPiece {
  int64_t flat_begin = 0;
  int64_t local_begin = 0;
  int64_t size = 0;
};
std::vector<OwnedPiece> owned_pieces_flat(const std::vector<OwnedRange>& owned, int64_t flat_begin, int64_t flat_end);
std::vector<OwnedPiece> owned_pieces_local(const std::vector<OwnedRange>& owned, int64_t local_begin,
                                           int64_t local_end);

// The fragment table: which elements of which parameter a rank holds, and where in its shard.
// Elements [begin, end) of parameter `param` (flattened) sit at [local, local + end - begin) of
// the rank's shard buffers (master weights, optimizer state, gradient shard). This is what
// checkpoints record, so a checkpoint can be read back under any other layout.
struct Fragment {
  int64_t param = 0;
  int64_t begin = 0;
  int64_t end = 0;
  int64_t local = 0;
};
std::vector<Fragment> fragments(const FlatLayout& layout, const std::vector<OwnedRange>& owned);

}  // namespace zeal::zero
