// The _zeal extension module: the layers' bindings, registered bottom up (a type must be known
// before a later signature or default argument names it).
#include "bindings.h"

#include "zeal/core/error.h"
#include "zeal/features.h"

namespace zeal::bindings {

comm::Timeout to_timeout(double seconds) {
  return comm::Timeout(static_cast<int64_t>(seconds * 1000.0));
}

comm::ReduceOp to_reduce_op(const std::string& name) {
  if (name == "sum") return comm::ReduceOp::kSum;
  if (name == "avg") return comm::ReduceOp::kAvg;
  if (name == "max") return comm::ReduceOp::kMax;
  if (name == "min") return comm::ReduceOp::kMin;
  throw CommError("unknown reduce op '" + name + "': expected sum, avg, max or min");
}

}  // namespace zeal::bindings

PYBIND11_MODULE(_zeal, m) {
  using namespace zeal::bindings;
  m.doc() = "Zeal's C++ core";
  m.attr("__version__") = ZEAL_VERSION;
  m.attr("__git_hash__") = ZEAL_GIT_HASH;
  m.attr("__git_branch__") = ZEAL_GIT_BRANCH;
  m.attr("with_cuda") = static_cast<bool>(ZEAL_WITH_CUDA);
  bind_core(m);
  bind_comm(m);
  bind_parallel(m);
  bind_optim(m);
  bind_checkpoint(m);
  bind_engine(m);
}
