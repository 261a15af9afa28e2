// The Adam loop compiled for the avx2 instruction set (flags set in CMakeLists.txt).
#include "cpu/adam_impl.h"

namespace zeal::kernels::detail {
void adam_step_avx2(const AdamArgs& args) { adam_dispatch(args); }
}  // namespace zeal::kernels::detail
