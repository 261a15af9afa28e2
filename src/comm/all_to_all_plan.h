// The element counts and offsets of one all_to_all, equal or uneven, checked once for every
// backend (the shape rules of AllToAllOptions in communicator.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/comm/communicator.h"

namespace zeal::comm {

struct AllToAllPlan {
  bool uneven = false;
  int64_t row = 1;  // elements per dim-0 row (uneven), 1 for an equal exchange
  std::vector<int64_t> send_counts, send_offsets, recv_counts, recv_offsets;  // elements, per rank
};

// Throws CommError naming what is inconsistent (split lengths, negative sizes, sums that are not
// the tensors' dim 0, row widths that differ, an equal exchange not divisible by the group size).
AllToAllPlan plan_all_to_all(const at::Tensor& output, const at::Tensor& input, const AllToAllOptions& opts,
                             int group_size);

}  // namespace zeal::comm
