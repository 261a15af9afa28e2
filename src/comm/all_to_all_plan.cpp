#include "all_to_all_plan.h"

#include "zeal/core/checks.h"
#include "zeal/core/error.h"

namespace zeal::comm {
namespace {

std::string show(const std::vector<int64_t>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

// One side's counts and offsets in elements, from its split sizes in rows.
void lay_out(const std::vector<int64_t>& splits, const at::Tensor& t, int64_t row, const char* side,
             std::vector<int64_t>& counts, std::vector<int64_t>& offsets) {
  int64_t rows = 0;
  for (int64_t s : splits) {
    ZEAL_CHECK_AS(CommError, s >= 0, "all_to_all: ", side, "_split_sizes ", show(splits), " holds a negative size");
    offsets.push_back(rows * row);
    counts.push_back(s * row);
    rows += s;
  }
  const int64_t have = t.dim() == 0 ? 1 : t.size(0);
  ZEAL_CHECK_AS(CommError, rows == have, "all_to_all: ", side, "_split_sizes ", show(splits), " sum to ", rows,
                " rows but the ", side, " has ", have, " rows in dim 0");
}

}  // namespace

AllToAllPlan plan_all_to_all(const at::Tensor& output, const at::Tensor& input, const AllToAllOptions& opts,
                             int group_size) {
  AllToAllPlan plan;
  const bool has_in = !opts.input_split_sizes.empty(), has_out = !opts.output_split_sizes.empty();
  if (!has_in && !has_out) {
    ZEAL_CHECK_AS(CommError, input.numel() == output.numel() && input.numel() % group_size == 0,
                  "all_to_all: input and output need the same number of elements, divisible by the group size ",
                  group_size, "; got input ", input.numel(), " and output ", output.numel());
    const int64_t chunk = input.numel() / group_size;
    for (int j = 0; j < group_size; ++j) {
      plan.send_counts.push_back(chunk);
      plan.send_offsets.push_back(j * chunk);
    }
    plan.recv_counts = plan.send_counts;
    plan.recv_offsets = plan.send_offsets;
    return plan;
  }
  // torch's rule: a side without splits is cut into equal chunks.
  auto equal = [&](const at::Tensor& t, const char* side) {
    const int64_t rows = t.dim() == 0 ? 1 : t.size(0);
    ZEAL_CHECK_AS(CommError, rows % group_size == 0, "all_to_all: the ", side, " has no split sizes and its ", rows,
                  " rows do not divide into ", group_size, " equal chunks");
    return std::vector<int64_t>(group_size, rows / group_size);
  };
  const std::vector<int64_t> in_splits = has_in ? opts.input_split_sizes : equal(input, "input");
  const std::vector<int64_t> out_splits = has_out ? opts.output_split_sizes : equal(output, "output");
  ZEAL_CHECK_AS(CommError, static_cast<int>(in_splits.size()) == group_size &&
                               static_cast<int>(out_splits.size()) == group_size,
                "all_to_all: split sizes need one entry per rank of the group (", group_size, "); got input ",
                show(in_splits), " and output ", show(out_splits));
  auto row_of = [](const at::Tensor& t) { return t.dim() == 0 || t.size(0) == 0 ? int64_t(-1) : t.numel() / t.size(0); };
  const int64_t in_row = row_of(input), out_row = row_of(output);
  ZEAL_CHECK_AS(CommError, in_row < 0 || out_row < 0 || in_row == out_row,
                "all_to_all: input rows hold ", in_row, " elements but output rows hold ", out_row);
  plan.uneven = true;
  // An empty side still has a row width when its trailing dims are known.
  const int64_t fallback = [&] {
    for (const at::Tensor* t : {&input, &output}) {
      if (t->dim() <= 1) continue;
      int64_t w = 1;
      for (int64_t d = 1; d < t->dim(); ++d) w *= t->size(d);
      return w;
    }
    return int64_t(1);
  }();
  plan.row = in_row >= 0 ? in_row : out_row >= 0 ? out_row : fallback;
  lay_out(in_splits, input, plan.row, "input", plan.send_counts, plan.send_offsets);
  lay_out(out_splits, output, plan.row, "output", plan.recv_counts, plan.recv_offsets);
  return plan;
}

}  // namespace zeal::comm
