// CPU chunk kernels of accumulate_: one function per (instruction set, acc dtype,
// grad dtype), each updating one contiguous chunk. The instruction set is chosen at
// run time, so a build with no -march flag still runs AVX2 / AVX-512 code.
#pragma once

#include "accumulate_math.h"

#include <cstdint>

namespace mbfused::cpu {

struct ChunkResult {
  bool nonfinite;  // a gradient element of the chunk was inf or nan
  double norm_sq;  // sum of the squares of the chunk's updated accumulator elements
};

using ChunkKernel = ChunkResult (*)(
    void* acc, const void* grad, int64_t n, float scale, bool overwrite, bool want_norm);

// kernels[acc kind][grad kind], indexed by ScalarKind.
struct ChunkKernelTable {
  ChunkKernel kernels[kNumScalarKinds][kNumScalarKinds];
};

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);

// The best instruction set this CPU supports, capped by MBFUSED_CPU_ISA
// (scalar|avx2|avx512) when set, so every path can be tested on one machine.
Isa selected_isa();

const ChunkKernelTable& kernels_for(Isa isa);

// Per-instruction-set tables, each defined in its own translation unit.
const ChunkKernelTable& scalar_kernels();
const ChunkKernelTable& avx2_kernels();
const ChunkKernelTable& avx512_kernels();

// Elements per block whose squares are summed in fp32 lanes before the block's sum is
// added in fp64: keeps norm_sq accurate (rel. error ~1e-7 at 1e8 elements) at the
// cost of one horizontal add per block.
constexpr int64_t kNormBlock = 1024;

// Fills a table with Kernel<Acc, Grad>::run for every dtype pairing.
template <template <typename, typename> class Kernel>
ChunkKernelTable make_table() {
  using c10::BFloat16;
  using c10::Half;
  ChunkKernelTable table{};
  auto& k = table.kernels;
  k[0][0] = &Kernel<float, float>::run;
  k[0][1] = &Kernel<float, BFloat16>::run;
  k[0][2] = &Kernel<float, Half>::run;
  k[1][0] = &Kernel<BFloat16, float>::run;
  k[1][1] = &Kernel<BFloat16, BFloat16>::run;
  k[1][2] = &Kernel<BFloat16, Half>::run;
  k[2][0] = &Kernel<Half, float>::run;
  k[2][1] = &Kernel<Half, BFloat16>::run;
  k[2][2] = &Kernel<Half, Half>::run;
  return table;
}

// The scalar loop over elements [begin, end): the whole chunk on the scalar path, the
// tail after the last full vector on the vector paths.
template <typename Acc, typename Grad>
inline ChunkResult scalar_range(
    Acc* acc, const Grad* grad, int64_t begin, int64_t end, float scale, bool overwrite) {
  ChunkResult result{false, 0.0};
  for (int64_t i = begin; i < end;) {
    const int64_t block_end = end - i < kNormBlock ? end : i + kNormBlock;
    float block = 0.0f;
    for (; i < block_end; ++i) {
      const float stored = accumulate_element(acc[i], grad[i], scale, overwrite, result.nonfinite);
      block += stored * stored;
    }
    result.norm_sq += block;
  }
  return result;
}

}  // namespace mbfused::cpu
