// Portable chunk kernels: the shared per-element math in a plain loop.
#include "cpu/chunk_kernels.h"

namespace mbfused::cpu {
namespace {

template <typename Acc, typename Grad>
struct ScalarKernel {
  static ChunkResult run(void* acc, const void* grad, int64_t n, float scale, bool overwrite, bool) {
    return scalar_range(static_cast<Acc*>(acc), static_cast<const Grad*>(grad), 0, n, scale, overwrite);
  }
};

}  // namespace

const ChunkKernelTable& scalar_kernels() {
  static const ChunkKernelTable table = make_table<ScalarKernel>();
  return table;
}

}  // namespace mbfused::cpu
