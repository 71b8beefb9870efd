// Portable chunk kernels: the shared per-element math in plain loops.
#include "cpu/chunk_kernels.h"

namespace mbfused::cpu {
namespace {

template <typename Acc, typename Grad>
struct ScalarAccumulate {
  static ChunkResult run(void* acc, const void* grad, int64_t n, float scale, bool overwrite, bool /*streaming*/,
                         bool /*want_norm*/, const RandomStream* random) {
    if (random != nullptr) {
      return accumulate_range_stochastic(static_cast<Acc*>(acc), static_cast<const Grad*>(grad), n, scale,
                                         overwrite, *random);
    }
    return accumulate_range(static_cast<Acc*>(acc), static_cast<const Grad*>(grad), 0, n, scale, overwrite);
  }
};

template <typename Src, typename Dst>
struct ScalarScale {
  static void run(const void* src, void* dst, int64_t n, float coef, bool /*streaming*/) {
    scale_range(static_cast<const Src*>(src), static_cast<Dst*>(dst), 0, n, coef);
  }
};

template <typename Src>
struct ScalarSumSquares {
  static double run(const void* src, int64_t n) {
    return sum_squares_range(static_cast<const Src*>(src), 0, n);
  }
};

}  // namespace

const KernelTable& scalar_kernels() {
  static const KernelTable table = make_table<ScalarAccumulate, ScalarScale, ScalarSumSquares>();
  return table;
}

}  // namespace mbfused::cpu
