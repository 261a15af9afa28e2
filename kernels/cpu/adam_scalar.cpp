// The Adam loop compiled for the scalar instruction set (flags set in CMakeLists.txt).
#include "cpu/adam_impl.h"

namespace zeal::kernels::detail {
void adam_step_scalar(const AdamArgs& args) { adam_dispatch(args); }
}  // namespace zeal::kernels::detail
