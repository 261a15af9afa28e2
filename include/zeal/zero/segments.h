// The optimizer's segments: which elements of this rank's owned (fp32 master) buffer belong to
// which of the user's parameter groups, cut from the flat layout and the ownership table. Pure:
// no tensors, no communicator; unit-tested (tests/cpp/test_layout.cpp) against every owned element.
#pragma once

#include <cstdint>
#include <vector>

#include "zeal/optim/optimizer.h"
#include "zeal/zero/layout.h"

namespace zeal::zero {

struct Segments {
  // Pieces in local (owned) coordinates, each with its group's hyperparameters; `group_of[k]` is
  // the user group of segment k (the engine refreshes lr and betas from it every step).
  std::vector<optim::ParamGroup> local;
  std::vector<size_t> group_of;
  // Replicated optimizer state (Note [Replicated momentum] in optim/optimizer.cpp): the groups'
  // whole flat ranges, cut where this rank's ownership starts and ends (empty unless asked for).
  std::vector<optim::ParamGroup> flat;
  std::vector<size_t> flat_group_of;
};

struct SegmentSpec {
  const FlatLayout* layout = nullptr;
  const std::vector<OwnedRange>* owned = nullptr;
  std::vector<optim::ParamGroup> groups;  // the user's groups (hyperparameters)
  std::vector<size_t> group_of_param;     // parallel to the layout's parameters
  bool per_tensor = false;                // one segment per owned piece of each parameter (Lamb)
  bool flat_state = false;                // also the flat-coordinate segments
};

Segments build_segments(const SegmentSpec& spec);

}  // namespace zeal::zero
