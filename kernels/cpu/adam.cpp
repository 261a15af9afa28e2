#include "cpu/adam.h"

namespace zeal::kernels {
namespace detail {
void adam_step_scalar(const AdamArgs& args);
void adam_step_avx2(const AdamArgs& args);
void adam_step_avx512(const AdamArgs& args);
}  // namespace detail

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
  switch (isa) {
    case Isa::kAvx512: return detail::adam_step_avx512(args);
    case Isa::kAvx2: return detail::adam_step_avx2(args);
    case Isa::kScalar: return detail::adam_step_scalar(args);
  }
}

}  // namespace zeal::kernels
