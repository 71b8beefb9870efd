#include "cpu/chunk_kernels.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace mbfused::cpu {
namespace {

Isa hardware_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kScalar;
}

}  // namespace

int kind_index(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kBFloat16: return static_cast<int>(ScalarKind::kBFloat16);
    case c10::kHalf: return static_cast<int>(ScalarKind::kHalf);
    default: return static_cast<int>(ScalarKind::kFloat);
  }
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Isa selected_isa() {
  static const Isa hardware = hardware_isa();
  const char* requested = std::getenv("MBFUSED_CPU_ISA");
  if (requested == nullptr || *requested == '\0') {
    return hardware;
  }
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(requested, isa_name(isa)) == 0) {
      return static_cast<int>(isa) < static_cast<int>(hardware) ? isa : hardware;
    }
  }
  TORCH_CHECK_VALUE(false, "MBFUSED_CPU_ISA must be one of scalar, avx2, avx512; got '", requested, "'");
}

const KernelTable& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return avx512_kernels();
    case Isa::kAvx2: return avx2_kernels();
    default: return scalar_kernels();
  }
}

}  // namespace mbfused::cpu
