// The vectorised chunk kernels, written once over an instruction-set traits class `V`
// (see kernels_avx2.cpp, kernels_avx512.cpp). Include it only after the translation
// unit's `#pragma GCC target`, with `V` in an anonymous namespace, so the code is
// compiled for that instruction set and its symbols stay local to the unit.
#pragma once

#include "cpu/chunk_kernels.h"

namespace mbfused::cpu {

// Philox4x32-10 on V's integer lanes, one block per lane, for kPasses * kWidth blocks:
// words[4 * j + w] = word w of block first_block + j of tensor `tensor`. Read as 16-bit
// halves (little-endian), half i is the random bits of element 8 * first_block + i (see
// stochastic_word). The passes are independent chains of multiplies, interleaved round
// by round: one pass alone waits on each round's multiply latency.
template <class V, int kPasses>
inline void philox_words(PhiloxKey key, uint64_t tensor, uint64_t first_block, uint32_t* words) {
  using IVec = typename V::IVec;
  IVec c0[kPasses], c1[kPasses], c2[kPasses], c3[kPasses];
  for (int p = 0; p < kPasses; ++p) {
    const uint64_t pass_block = first_block + static_cast<uint64_t>(p) * V::kWidth;
    const auto low = static_cast<uint32_t>(pass_block);
    if (low <= UINT32_MAX - (V::kWidth - 1)) {  // no carry into the high word across the lanes
      c0[p] = V::iadd(V::iset1(low), V::iota());
      c1[p] = V::iset1(static_cast<uint32_t>(pass_block >> 32));
    } else {
      alignas(64) uint32_t lows[V::kWidth];
      alignas(64) uint32_t highs[V::kWidth];
      for (int64_t j = 0; j < V::kWidth; ++j) {
        lows[j] = static_cast<uint32_t>(pass_block + j);
        highs[j] = static_cast<uint32_t>((pass_block + j) >> 32);
      }
      c0[p] = V::iload(lows);
      c1[p] = V::iload(highs);
    }
    c2[p] = V::iset1(static_cast<uint32_t>(tensor));
    c3[p] = V::iset1(static_cast<uint32_t>(tensor >> 32));
  }
  uint32_t k0 = key.lo;
  uint32_t k1 = key.hi;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int p = 0; p < kPasses; ++p) {
      IVec hi0, lo0, hi1, lo1;
      V::mulhilo(c0[p], 0xD2511F53u, hi0, lo0);
      V::mulhilo(c2[p], 0xCD9E8D57u, hi1, lo1);
      c0[p] = V::ixor3(hi1, c1[p], V::iset1(k0));
      c1[p] = lo1;
      c2[p] = V::ixor3(hi0, c3[p], V::iset1(k1));
      c3[p] = lo0;
    }
  }
  for (int p = 0; p < kPasses; ++p) {
    V::store_transposed(words + 4 * V::kWidth * p, c0[p], c1[p], c2[p], c3[p]);
  }
}

// Stochastic stores of a vector of fp32 sums with their elements' 16 random bits; each
// returns the value as stored, widened back to fp32. fp32 is stored as is; fp16 rounds
// lane by lane with the shared scalar definition (its subnormal range has no short
// vector form).
template <class V>
inline typename V::Vec store_stochastic(float* p, typename V::Vec v, const uint16_t*) {
  return V::store(p, v);
}

template <class V>
inline typename V::Vec store_stochastic(c10::BFloat16* p, typename V::Vec v, const uint16_t* random) {
  return V::store_stochastic(p, v, V::iload_high_halves(random));
}

template <class V>
inline typename V::Vec store_stochastic(c10::Half* p, typename V::Vec v, const uint16_t* random) {
  alignas(64) float values[V::kWidth];
  V::store(values, v);
  for (int64_t j = 0; j < V::kWidth; ++j) {
    p[j] = stochastic_from_float<c10::Half>(values[j], static_cast<uint32_t>(random[j]) << 16);
  }
  return V::load(p);
}

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

  // Stochastic rounding: each Philox pass gives the random bits of 8 * kWidth elements,
  // V::kPhiloxPasses passes interleaved. acc may be grad itself (finalize_'s in-place
  // stochastic pass runs this kernel): each element is loaded before it is stored, and
  // the pointers must never be marked restrict.
  static constexpr int kPhiloxPasses = V::kPhiloxPasses;
  static ChunkResult stochastic_body(Acc* acc, const Grad* grad, int64_t n, float scale, bool overwrite,
                                     const RandomStream& random) {
    constexpr int64_t kGroup = 8 * V::kWidth * kPhiloxPasses;
    static_assert(kNormBlock % kGroup == 0, "norm blocks hold whole Philox passes");
    if (random.first_element % 8 != 0) {
      return accumulate_range_stochastic(acc, grad, n, scale, overwrite, random);
    }
    const typename V::Vec vscale = V::set1(scale);
    typename V::Mask nonfinite = V::empty_mask();
    double norm_sq = 0.0;
    // Written by vector stores (which may alias anything), read as 16-bit halves.
    alignas(64) uint16_t halves[kGroup];
    const int64_t group_end = n - n % kGroup;
    int64_t i = 0;
    while (i < group_end) {
      const int64_t block_end = group_end - i < kNormBlock ? group_end : i + kNormBlock;
      typename V::Vec block = V::zero();
      for (; i < block_end; i += kGroup) {
        philox_words<V, kPhiloxPasses>(random.key, random.tensor, static_cast<uint64_t>(random.first_element + i) / 8,
                        reinterpret_cast<uint32_t*>(halves));
        for (int64_t k = 0; k < kGroup; k += V::kWidth) {
          const typename V::Vec g = V::load(grad + i + k);
          nonfinite = V::mark_nonfinite(nonfinite, g);
          const typename V::Vec scaled = V::mul(g, vscale);
          const typename V::Vec sum = overwrite ? scaled : V::add(V::load(acc + i + k), scaled);
          const typename V::Vec stored = store_stochastic<V>(acc + i + k, sum, halves + k);
          block = V::add(block, V::mul(stored, stored));
        }
      }
      norm_sq += V::reduce_add(block);
    }
    const RandomStream tail_random{random.key, random.tensor, random.first_element + group_end};
    ChunkResult tail = accumulate_range_stochastic(acc + group_end, grad + group_end, n - group_end, scale,
                                                   overwrite, tail_random);
    return {V::any(nonfinite) || tail.nonfinite, norm_sq + tail.norm_sq};
  }

  static ChunkResult run(void* acc_ptr, const void* grad_ptr, int64_t n, float scale, bool overwrite,
                         bool want_norm, const RandomStream* random) {
    auto* acc = static_cast<Acc*>(acc_ptr);
    const auto* grad = static_cast<const Grad*>(grad_ptr);
    if (random != nullptr) {
      return stochastic_body(acc, grad, n, scale, overwrite, *random);
    }
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
