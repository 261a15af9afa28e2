// The optimizer loops compiled for the avx2 instruction set (flags set in CMakeLists.txt).
#include "cpu/optim_kernels_impl.h"

namespace zeal::kernels::detail {
void adam_step_avx2(const AdamArgs& args) { adam_dispatch(args); }
void adagrad_step_avx2(const AdagradArgs& args) { adagrad_loop(args); }
void sgd_step_avx2(const SgdArgs& args) { sgd_dispatch(args); }
NormSums lamb_phase1_avx2(const LambArgs& args) { return lamb_phase1_loop(args); }
void lamb_phase2_avx2(const LambArgs& args, double ratio) { lamb_phase2_loop(args, ratio); }
double unscale_sum_squares_avx2(const UnscaleArgs& args) { return unscale_sum_squares_dispatch(args); }
void triad_avx2(const TriadArgs& args) { triad_loop(args); }
}  // namespace zeal::kernels::detail
