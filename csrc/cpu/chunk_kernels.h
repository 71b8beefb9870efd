// CPU chunk kernels: one function per (instruction set, operation, dtypes), each
// working on one contiguous chunk. The instruction set is chosen at run time, so a
// build with no -march flag still runs AVX2 / AVX-512 code.
#pragma once

#include "accumulate_math.h"
#include "philox.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace mbfused::cpu {

struct ChunkResult {
  bool nonfinite;  // a gradient element of the chunk was inf or nan
  double norm_sq;  // sum of the squares of the chunk's updated accumulator elements
};

// Where a chunk's random words come from under stochastic rounding: the call's key,
// the tensor's index in the call and the chunk's first element within the tensor.
struct RandomStream {
  PhiloxKey key;
  uint64_t tensor;
  int64_t first_element;
};

// accumulate_: acc[0:n] <- (overwrite ? 0 : acc) + grad * scale, rounded to nearest, or
// stochastically when `random` is given. `streaming` (with overwrite, rounded to
// nearest): the vector kernels store acc with non-temporal stores where its vectors are
// aligned; the values are the same.
using AccumulateKernel = ChunkResult (*)(
    void* acc, const void* grad, int64_t n, float scale, bool overwrite, bool streaming, bool want_norm,
    const RandomStream* random);
// finalize_'s scaling pass: dst[0:n] <- src * coef (dst may be src). `streaming`: dst is
// another tensor than src, written with non-temporal stores (the vector kernels; the
// scalar ones store as usual).
using ScaleKernel = void (*)(const void* src, void* dst, int64_t n, float coef, bool streaming);
// finalize_'s norm pass: sum of src[0:n]^2.
using SumSquaresKernel = double (*)(const void* src, int64_t n);

// Indexed by ScalarKind: accumulate[acc][grad], scale[src][dst], sum_squares[src].
struct KernelTable {
  AccumulateKernel accumulate[kNumScalarKinds][kNumScalarKinds];
  ScaleKernel scale[kNumScalarKinds][kNumScalarKinds];
  SumSquaresKernel sum_squares[kNumScalarKinds];
};

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);

// The best instruction set this CPU supports, capped by MBFUSED_CPU_ISA
// (scalar|avx2|avx512) when set, so every path can be tested on one machine.
Isa selected_isa();

const KernelTable& kernels_for(Isa isa);

// Per-instruction-set tables, each defined in its own translation unit.
const KernelTable& scalar_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();

// Elements per block whose squares are summed in fp32 lanes before the block's sum is
// added in fp64: keeps norms accurate (rel. error ~1e-7 at 1e8 elements) at the cost
// of one horizontal add per block.
constexpr int64_t kNormBlock = 1024;

int kind_index(c10::ScalarType dtype);

template <template <typename, typename> class Kernel, typename Fn>
void fill_pairs(Fn (&table)[kNumScalarKinds][kNumScalarKinds]) {
  using c10::BFloat16;
  using c10::Half;
  table[0][0] = &Kernel<float, float>::run;
  table[0][1] = &Kernel<float, BFloat16>::run;
  table[0][2] = &Kernel<float, Half>::run;
  table[1][0] = &Kernel<BFloat16, float>::run;
  table[1][1] = &Kernel<BFloat16, BFloat16>::run;
  table[1][2] = &Kernel<BFloat16, Half>::run;
  table[2][0] = &Kernel<Half, float>::run;
  table[2][1] = &Kernel<Half, BFloat16>::run;
  table[2][2] = &Kernel<Half, Half>::run;
}

// Fills a table from kernel templates: Accumulate<Acc, Grad>::run,
// Scale<Src, Dst>::run and SumSquares<Src>::run for every dtype.
template <template <typename, typename> class Accumulate, template <typename, typename> class Scale,
          template <typename> class SumSquares>
KernelTable make_table() {
  KernelTable table{};
  fill_pairs<Accumulate>(table.accumulate);
  fill_pairs<Scale>(table.scale);
  table.sum_squares[0] = &SumSquares<float>::run;
  table.sum_squares[1] = &SumSquares<c10::BFloat16>::run;
  table.sum_squares[2] = &SumSquares<c10::Half>::run;
  return table;
}

// Scalar loops over elements [begin, end): the whole chunk on the scalar path, the
// tail after the last full vector on the vector paths.
template <typename Acc, typename Grad>
inline ChunkResult accumulate_range(
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

// The stochastic-rounding loop: one Philox block per eight elements (element e of the
// tensor takes stochastic_word(block e / 8, e % 8), as mbfused.reference.stochastic_bits).
// acc may be grad itself (finalize_'s in-place stochastic pass): never mark them restrict.
template <typename Acc, typename Grad>
inline ChunkResult accumulate_range_stochastic(
    Acc* acc, const Grad* grad, int64_t n, float scale, bool overwrite, const RandomStream& random) {
  ChunkResult result{false, 0.0};
  PhiloxBlock words{};
  for (int64_t i = 0; i < n;) {
    const int64_t block_end = n - i < kNormBlock ? n : i + kNormBlock;
    float block = 0.0f;
    for (; i < block_end; ++i) {
      const auto element = static_cast<uint64_t>(random.first_element + i);
      if (i == 0 || element % 8 == 0) {
        words = stochastic_block(random.key, random.tensor, element / 8);
      }
      const float stored = accumulate_element_stochastic(
          acc[i], grad[i], scale, overwrite, result.nonfinite, stochastic_word(words, static_cast<int>(element % 8)));
      block += stored * stored;
    }
    result.norm_sq += block;
  }
  return result;
}

template <typename Src, typename Dst>
inline void scale_range(const Src* src, Dst* dst, int64_t begin, int64_t end, float coef) {
  for (int64_t i = begin; i < end; ++i) {
    dst[i] = scaled_element<Dst>(src[i], coef);
  }
}

template <typename Src>
inline double sum_squares_range(const Src* src, int64_t begin, int64_t end) {
  double total = 0.0;
  for (int64_t i = begin; i < end;) {
    const int64_t block_end = end - i < kNormBlock ? end : i + kNormBlock;
    float block = 0.0f;
    for (; i < block_end; ++i) {
      const float value = to_float(src[i]);
      block += value * value;
    }
    total += block;
  }
  return total;
}

}  // namespace mbfused::cpu
