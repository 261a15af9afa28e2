// Where a parameter lives on the mesh, and the rules that follow from it. Pure functions of the
// mesh and the tags, unit-tested without ranks (tests/cpp/test_mesh.cpp).
//
// Note [Parameter placement]: a parameter is held by every rank of the mesh, and on each axis it is
// either replicated (the same value on every rank of the axis) or split (ranks hold different
// values: tensor-parallel slices, different experts). Two kinds of axes:
//   batch axes (data, data_inner, expert, ring, sequence): the ranks see different tokens, so a weight
//     replicated over them gets different gradients there, which are summed (and ZeRO partitions
//     its state over the same ranks): the reduction group is the product of its replicated batch axes;
//   model axes (tensor, pipe): the ranks hold different parts of the model. A weight replicated over
//     tensor (a LayerNorm beside tensor-parallel linears) gets the same gradient on every tensor
//     rank, so nothing is reduced and the norm counts it once, on tensor rank 0. Every pipeline stage
//     holds its own layers (split over pipe), except a tied weight, which the stages named in
//     `tied_stages` hold in copies: the pipeline sums their gradients, and the first of them counts it.
// The global gradient norm sums each distinct value once: over the reduction group each rank counts
// the part ZeRO gave it (or, unpartitioned, every rank holds the whole reduced gradient and counts it
// within its group only), and across the complement of the reduction group the rank-local sums add
// up, with the once-per-value rule above deciding which ranks count a replicated weight.
#pragma once

#include <string>
#include <vector>

#include "zeal/parallel/mesh.h"

namespace zeal::parallel {

struct Placement {
  std::vector<std::string> split;  // axes over which ranks hold different values
  std::vector<int> tied_stages;    // pipe coordinates holding a tied copy; empty: this stage's own
};

// data, data_inner, expert, ring, sequence.
const std::vector<std::string>& batch_axes();

// Note [Samples per step]: the batch axes whose ranks see different samples: data, data_inner,
// expert (the ring and sequence ranks hold pieces of the same samples). Their product is the data-parallel
// size of the batch arithmetic (train_batch_size = micro x accumulation x this), as DeepSpeed's
// dp_world_size counts it when sequence parallelism is on.
const std::vector<std::string>& sample_axes();
int samples_group_size(const Mesh& mesh);

// Note [Expert gradients]: the number of ranks a parameter's summed gradient is divided by. Every
// rank's loss is the mean over its own samples and the step follows the mean over every sample
// rank of the mesh. A parameter replicated over the sample axes gets every rank's gradient from
// its reduction group; one split over a sample axis (an expert, private to its expert rank) gets,
// through the dispatch all-to-all, the gradient of every expert rank's tokens already summed, so
// the reduction group (its expert-data ranks) covers all of them only times the split axes' sizes.
// Dividing by its reduction group alone would make expert gradients `expert`-times too large; the
// divisor is the same for every parameter, as DeepSpeed divides expert gradients by its whole
// data-parallel size too. Returns reduction-group size x the sizes of the split sample axes.
int gradient_divisor(const Mesh& mesh, const Placement& placement);

// The axes its gradient is summed over (mesh order; size-1 axes left out): its replicated batch axes.
std::vector<std::string> reduction_axes(const Mesh& mesh, const Placement& placement);

// Whether `rank` counts the parameter in the global gradient norm (once per distinct value).
bool counts_in_norm(const Mesh& mesh, int rank, const Placement& placement);

// "split over tensor; tied across stages 0, 3" — for messages.
std::string describe(const Placement& placement);

}  // namespace zeal::parallel
