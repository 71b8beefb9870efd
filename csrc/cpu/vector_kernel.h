// The vectorised chunk kernels, written once over an instruction-set traits class `V`
// (see kernels_avx2.cpp, kernels_avx512.cpp). Include it only after the translation
// unit's `#pragma GCC target`, with `V` in an anonymous namespace, so the code is
// compiled for that instruction set and its symbols stay local to the unit.
#pragma once

#include "cpu/chunk_kernels.h"

namespace mbfused::cpu {

// Philox4x32-10 on V's 64-bit lanes, one block per lane, each of the four words in the
// low half of its lane: V::mul_wide (vpmuludq) reads only the low halves and returns
// the full 64-bit product, so lo is already in place and hi needs one move (V::high_words)
// per multiply; the high halves carry garbage that nothing reads. That is 6 uops per
// round for V::kPhiloxBlocks blocks, against 16 for twice as many blocks with one block
// per 32-bit lane (where the odd lanes' products need shifts and blends).
//
// Writes the random bits of kSets * V::kPhiloxBlocks consecutive blocks from
// first_block of tensor `tensor` as 4 * kSets vectors: random[v] holds, for the kWidth
// elements from 8 * first_block + kWidth * v on, each element's 16 random bits (see
// stochastic_word) in the low half of its 32-bit lane, the high half zero. The sets are
// independent chains of multiplies, interleaved round by round: one set alone waits on
// each round's multiply latency.
template <class V, int kSets>
inline void philox_random(PhiloxKey key, uint64_t tensor, uint64_t first_block, typename V::IVec* random) {
  using IVec = typename V::IVec;
  IVec c0[kSets], c1[kSets], c2[kSets], c3[kSets];
  for (int s = 0; s < kSets; ++s) {
    // The 64-bit lanes hold the block numbers: word 0 (low half) and word 1 (shifted down).
    const IVec blocks = V::block_counters(first_block + static_cast<uint64_t>(s) * V::kPhiloxBlocks);
    c0[s] = blocks;
    c1[s] = V::high_words(blocks);
    c2[s] = V::iset1_64(tensor);
    c3[s] = V::iset1_64(tensor >> 32);
  }
  const IVec m0 = V::iset1(0xD2511F53u);
  const IVec m1 = V::iset1(0xCD9E8D57u);
  uint32_t k0 = key.lo;
  uint32_t k1 = key.hi;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const IVec vk0 = V::iset1(k0);
    const IVec vk1 = V::iset1(k1);
    for (int s = 0; s < kSets; ++s) {
      const IVec product0 = V::mul_wide(c0[s], m0);  // hi0:lo0
      const IVec product1 = V::mul_wide(c2[s], m1);  // hi1:lo1
      c0[s] = V::ixor3(V::high_words(product1), c1[s], vk0);
      c1[s] = product1;
      c2[s] = V::ixor3(V::high_words(product0), c3[s], vk1);
      c3[s] = product0;
    }
  }
  for (int s = 0; s < kSets; ++s) {
    V::random_halves(c0[s], c1[s], c2[s], c3[s], random + 4 * s);
  }
}

// Stochastic stores of a vector of fp32 sums with their elements' random bits (16 per
// lane, in the low half, as philox_random gives them); each returns the value as
// stored, widened back to fp32. fp32 is stored as is; fp16 rounds lane by lane with the
// shared scalar definition (its subnormal range has no short vector form).
template <class V>
inline typename V::Vec store_stochastic(float* p, typename V::Vec v, typename V::IVec) {
  return V::store(p, v);
}

template <class V>
inline typename V::Vec store_stochastic(c10::BFloat16* p, typename V::Vec v, typename V::IVec random) {
  return V::store_stochastic(p, v, random);
}

template <class V>
inline typename V::Vec store_stochastic(c10::Half* p, typename V::Vec v, typename V::IVec random) {
  alignas(64) float values[V::kWidth];
  alignas(64) uint32_t randoms[V::kWidth];
  V::store(values, v);
  V::istore(randoms, random);
  for (int64_t j = 0; j < V::kWidth; ++j) {
    p[j] = stochastic_from_float<c10::Half>(values[j], randoms[j] << 16);
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

  // Stochastic rounding: each Philox set gives the random bits of 4 * kWidth elements,
  // V::kPhiloxSets sets interleaved, kept in registers. acc may be grad itself
  // (finalize_'s in-place stochastic pass runs this kernel): each element is loaded
  // before it is stored, and the pointers must never be marked restrict.
  template <bool kOverwrite, bool kNorm>
  static ChunkResult stochastic_body(Acc* acc, const Grad* grad, int64_t n, float scale,
                                     const RandomStream& random) {
    constexpr int kSets = V::kPhiloxSets;
    constexpr int64_t kGroup = 4 * V::kWidth * kSets;
    static_assert(V::kPhiloxBlocks * 8 == 4 * V::kWidth, "a Philox set fills four vectors");
    static_assert(kNormBlock % kGroup == 0, "norm blocks hold whole Philox groups");
    if (random.first_element % 8 != 0) {
      return accumulate_range_stochastic(acc, grad, n, scale, kOverwrite, random);
    }
    const typename V::Vec vscale = V::set1(scale);
    typename V::Mask nonfinite = V::empty_mask();
    double norm_sq = 0.0;
    const int64_t group_end = n - n % kGroup;
    int64_t i = 0;
    while (i < group_end) {
      const int64_t block_end = group_end - i < kNormBlock ? group_end : i + kNormBlock;
      typename V::Vec block = V::zero();
      for (; i < block_end; i += kGroup) {
        typename V::IVec bits[4 * kSets];
        philox_random<V, kSets>(random.key, random.tensor, static_cast<uint64_t>(random.first_element + i) / 8, bits);
        for (int v = 0; v < 4 * kSets; ++v) {
          const int64_t k = i + v * V::kWidth;
          const typename V::Vec g = V::load(grad + k);
          nonfinite = V::mark_nonfinite(nonfinite, g);
          const typename V::Vec scaled = V::mul(g, vscale);
          const typename V::Vec sum = kOverwrite ? scaled : V::add(V::load(acc + k), scaled);
          const typename V::Vec stored = store_stochastic<V>(acc + k, sum, bits[v]);
          if (kNorm) {
            block = V::add(block, V::mul(stored, stored));
          }
        }
      }
      if (kNorm) {
        norm_sq += V::reduce_add(block);
      }
    }
    const RandomStream tail_random{random.key, random.tensor, random.first_element + group_end};
    ChunkResult tail = accumulate_range_stochastic(acc + group_end, grad + group_end, n - group_end, scale,
                                                   kOverwrite, tail_random);
    return {V::any(nonfinite) || tail.nonfinite, norm_sq + tail.norm_sq};
  }

  static ChunkResult run(void* acc_ptr, const void* grad_ptr, int64_t n, float scale, bool overwrite,
                         bool want_norm, const RandomStream* random) {
    auto* acc = static_cast<Acc*>(acc_ptr);
    const auto* grad = static_cast<const Grad*>(grad_ptr);
    if (random != nullptr) {
      if (overwrite) {
        return want_norm ? stochastic_body<true, true>(acc, grad, n, scale, *random)
                         : stochastic_body<true, false>(acc, grad, n, scale, *random);
      }
      return want_norm ? stochastic_body<false, true>(acc, grad, n, scale, *random)
                       : stochastic_body<false, false>(acc, grad, n, scale, *random);
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
