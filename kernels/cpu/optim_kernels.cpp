#include "cpu/optim_kernels.h"

namespace zeal::kernels {
namespace detail {
#define ZEAL_DECLARE_ISA(isa)                                \
  void adam_step_##isa(const AdamArgs& args);                \
  void adagrad_step_##isa(const AdagradArgs& args);          \
  void sgd_step_##isa(const SgdArgs& args);                  \
  NormSums lamb_phase1_##isa(const LambArgs& args);          \
  void lamb_phase2_##isa(const LambArgs& args, double ratio); \
  double unscale_sum_squares_##isa(const UnscaleArgs& args); \
  void triad_##isa(const TriadArgs& args);
ZEAL_DECLARE_ISA(scalar)
ZEAL_DECLARE_ISA(avx2)
ZEAL_DECLARE_ISA(avx512)
#undef ZEAL_DECLARE_ISA
}  // namespace detail

// The one dispatch idiom (STYLE.md habit 5): run-time instruction set -> the function compiled for it.
#define ZEAL_ISA_SWITCH(isa, fn, ...)                                  \
  switch (isa) {                                                       \
    case Isa::kAvx512: return detail::fn##_avx512(__VA_ARGS__);        \
    case Isa::kAvx2: return detail::fn##_avx2(__VA_ARGS__);            \
    case Isa::kScalar: break;                                          \
  }                                                                    \
  return detail::fn##_scalar(__VA_ARGS__)

bool isa_supported(Isa isa) {
#if !defined(__x86_64__)
  return isa == Isa::kScalar;
#else
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             isa_supported(Isa::kAvx2);
  }
  return false;
#endif
}

Isa best_isa() {
  static const Isa best = isa_supported(Isa::kAvx512) ? Isa::kAvx512 : isa_supported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar;
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

void adam_step(const AdamArgs& args, Isa isa) {
  if (args.n <= 0) return;
  ZEAL_ISA_SWITCH(isa, adam_step, args);
}

void adagrad_step(const AdagradArgs& args, Isa isa) {
  if (args.n <= 0) return;
  ZEAL_ISA_SWITCH(isa, adagrad_step, args);
}

void sgd_step(const SgdArgs& args, Isa isa) {
  if (args.n <= 0) return;
  ZEAL_ISA_SWITCH(isa, sgd_step, args);
}

NormSums lamb_phase1(const LambArgs& args, Isa isa) {
  if (args.n <= 0) return {};
  ZEAL_ISA_SWITCH(isa, lamb_phase1, args);
}

void lamb_phase2(const LambArgs& args, double trust_ratio, Isa isa) {
  if (args.n <= 0) return;
  ZEAL_ISA_SWITCH(isa, lamb_phase2, args, trust_ratio);
}

double unscale_sum_squares(const UnscaleArgs& args, Isa isa) {
  if (args.n <= 0) return 0.0;
  ZEAL_ISA_SWITCH(isa, unscale_sum_squares, args);
}

void triad(const TriadArgs& args, Isa isa) {
  if (args.n <= 0) return;
  ZEAL_ISA_SWITCH(isa, triad, args);
}

}  // namespace zeal::kernels
