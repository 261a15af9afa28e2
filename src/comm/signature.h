// Note [Collective signatures] (mpi_backend.cpp): what a rank says about each collective it
// issues, so that the ranks of a group can check they are in the same one. Both backends send it:
// the MPI backend in its arrival announcements, the NCCL backend through its host group.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/comm/communicator.h"

namespace zeal::comm {

// Plain bytes: it travels as it is.
struct Signature {
  static constexpr size_t kSiteChars = 48;
  uint64_t seq = 0;
  int64_t count = -1;   // elements; -1 for an op without data
  int32_t op = -1;      // op_code()
  int32_t reduce = -1;  // ReduceOp, or -1
  int32_t dtype = -1;   // at::ScalarType, or -1
  int32_t root = -1;
  // How this rank runs the op; not compared (ranks of one op may differ). kEagerExchange: an
  // all_to_all(v) small enough here that it sends its messages without waiting for the peers'
  // announcements (Note [Caller-run collectives]).
  int32_t flags = 0;
  static constexpr int32_t kEagerExchange = 1;
  char site[kSiteChars] = {};

  // seq 0: not yet numbered (the backend numbers it when it is queued).
  static Signature of(const std::string& op_name, const at::Tensor& tensor, const std::string& site, int reduce = -1,
                      int root = -1);
  bool same_as(const Signature& o) const {
    return seq == o.seq && count == o.count && op == o.op && reduce == o.reduce && dtype == o.dtype &&
           root == o.root && std::strncmp(site, o.site, kSiteChars) == 0;
  }
  const char* op_name() const;  // "reduce_scatter"; "op?" for no collective
  // "reduce_scatter #12 (grad bucket 1 round 3, 144 x Float, sum)"
  std::string describe() const;
};

int op_code(const std::string& op_name);  // -1 if not a collective

// The mismatch message every rank raises when the signatures of one op differ: the ranks grouped
// by signature, side by side, the smallest group first as the divergent one, then
// "[diverged: world ranks N]" (or "N or M" when two groups tie) for the launcher to read.
// signatures[r] is group rank r's (nullptr: not known yet).
std::string describe_mismatch(const std::string& group, uint64_t seq, int this_rank,
                              const std::vector<const Signature*>& signatures, const std::vector<int>& world_ranks);
// Whether the known signatures differ.
bool signatures_differ(const std::vector<const Signature*>& signatures);

}  // namespace zeal::comm
