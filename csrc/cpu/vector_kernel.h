// The vectorised chunk kernels, written once over an instruction-set traits class `V`
// (see kernels_avx2.cpp, kernels_avx512.cpp). Include it only after the translation
// unit's `#pragma GCC target`, with `V` in an anonymous namespace, so the code is
// compiled for that instruction set and its symbols stay local to the unit.
#pragma once

#include "cpu/chunk_kernels.h"

namespace mbfused::cpu {

template <class V, typename Acc, typename Grad>
struct VectorAccumulate {
  template <bool kOverwrite, bool kNorm>
  static ChunkResult body(Acc* acc, const Grad* grad, int64_t n, float scale) {
    const typename V::Vec vscale = V::set1(scale);
    typename V::Mask nonfinite = V::empty_mask();
    double norm_sq = 0.0;
    const int64_t vector_end = n - n % V::kWidth;
    int64_t i = 0;
    while (i < vector_end) {
      const int64_t block_end = vector_end - i < kNormBlock ? vector_end : i + kNormBlock;
      typename V::Vec block = V::zero();
      for (; i < block_end; i += V::kWidth) {
        const typename V::Vec g = V::load(grad + i);
        nonfinite = V::mark_nonfinite(nonfinite, g);
        const typename V::Vec scaled = V::mul(g, vscale);
        const typename V::Vec sum = kOverwrite ? scaled : V::add(V::load(acc + i), scaled);
        const typename V::Vec stored = V::store(acc + i, sum);
        if (kNorm) {
          block = V::add(block, V::mul(stored, stored));
        }
      }
      if (kNorm) {
        norm_sq += V::reduce_add(block);
      }
    }
    ChunkResult tail = accumulate_range(acc, grad, vector_end, n, scale, kOverwrite);
    return {V::any(nonfinite) || tail.nonfinite, norm_sq + tail.norm_sq};
  }

  static ChunkResult run(void* acc_ptr, const void* grad_ptr, int64_t n, float scale, bool overwrite,
                         bool want_norm) {
    auto* acc = static_cast<Acc*>(acc_ptr);
    const auto* grad = static_cast<const Grad*>(grad_ptr);
    if (overwrite) {
      return want_norm ? body<true, true>(acc, grad, n, scale) : body<true, false>(acc, grad, n, scale);
    }
    return want_norm ? body<false, true>(acc, grad, n, scale) : body<false, false>(acc, grad, n, scale);
  }
};

template <class V, typename Src, typename Dst>
struct VectorScale {
  static void run(const void* src_ptr, void* dst_ptr, int64_t n, float coef) {
    const auto* src = static_cast<const Src*>(src_ptr);
    auto* dst = static_cast<Dst*>(dst_ptr);
    const typename V::Vec vcoef = V::set1(coef);
    const int64_t vector_end = n - n % V::kWidth;
    for (int64_t i = 0; i < vector_end; i += V::kWidth) {
      V::store(dst + i, V::mul(V::load(src + i), vcoef));
    }
    scale_range(src, dst, vector_end, n, coef);
  }
};

template <class V, typename Src>
struct VectorSumSquares {
  static double run(const void* src_ptr, int64_t n) {
    const auto* src = static_cast<const Src*>(src_ptr);
    double total = 0.0;
    const int64_t vector_end = n - n % V::kWidth;
    int64_t i = 0;
    while (i < vector_end) {
      const int64_t block_end = vector_end - i < kNormBlock ? vector_end : i + kNormBlock;
      typename V::Vec block = V::zero();
      for (; i < block_end; i += V::kWidth) {
        const typename V::Vec value = V::load(src + i);
        block = V::add(block, V::mul(value, value));
      }
      total += V::reduce_add(block);
    }
    return total + sum_squares_range(src, vector_end, n);
  }
};

// The kernel templates of one instruction set, in the shape make_table takes.
template <class V>
struct VectorKernels {
  template <typename Acc, typename Grad>
  using Accumulate = VectorAccumulate<V, Acc, Grad>;
  template <typename Src, typename Dst>
  using Scale = VectorScale<V, Src, Dst>;
  template <typename Src>
  using SumSquares = VectorSumSquares<V, Src>;

  static KernelTable table() { return make_table<Accumulate, Scale, SumSquares>(); }
};

}  // namespace mbfused::cpu
