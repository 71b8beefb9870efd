// The vectorised chunk kernels, written once over an instruction-set traits class `V`
// (see kernels_avx2.cpp, kernels_avx512.cpp). Include it only after the translation
// unit's `#pragma GCC target`, with `V` in an anonymous namespace, so the code is
// compiled for that instruction set and its symbols stay local to the unit.
#pragma once

#include "cpu/chunk_kernels.h"

#include <algorithm>
#include <type_traits>

namespace mbfused::cpu {

// Philox4x32-10 on V's 64-bit lanes, one block per lane, each of the four words in the
// low half of its lane: V::mul_wide (vpmuludq) reads only the low halves and returns
// the full 64-bit product, so lo is already in place and hi needs one move (V::high_words)
// per multiply; the high halves carry garbage that nothing reads. That is 6 uops per
// round for V::kPhiloxBlocks blocks, against 16 for twice as many blocks with one block
// per 32-bit lane (where the odd lanes' products need shifts and blends).
//
// word[w][s] holds word w of the V::kPhiloxBlocks blocks from first_block +
// s * V::kPhiloxBlocks of tensor `tensor`. The sets s are independent chains of
// multiplies, interleaved round by round: one set alone waits on each round's
// multiply latency.
template <class V, int kSets>
struct PhiloxSets {
  typename V::IVec word[4][kSets];
};

template <class V, int kSets>
inline PhiloxSets<V, kSets> philox_sets(PhiloxKey key, uint64_t tensor, uint64_t first_block) {
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
  // Unrolled: GCC keeps the AVX2 rounds a loop otherwise (in cache: 0.65 ns per element
  // against 0.56 unrolled); AVX-512's it unrolls by itself.
#pragma GCC unroll 10
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
  PhiloxSets<V, kSets> sets;
  for (int s = 0; s < kSets; ++s) {
    sets.word[0][s] = c0[s];
    sets.word[1][s] = c1[s];
    sets.word[2][s] = c2[s];
    sets.word[3][s] = c3[s];
  }
  return sets;
}

// The accumulate kernels ask for the grad and acc kPrefetchAhead elements on: left to
// the hardware prefetchers, the loads wait on memory. The stochastic kernels ask for a
// group's before its Philox work, round-to-nearest every kPrefetchStride elements.
// Measured, bf16 into bf16, one thread: stochastic rounding went from 1.02x to 0.87x
// the time of round-to-nearest without prefetches, which then itself got about 17%
// faster (20% on two threads); 512 to 4096 elements ahead measure alike. Prefetches
// past the end of the data never fault.
constexpr int64_t kPrefetchAhead = 2048;
constexpr int64_t kPrefetchStride = 64;

// Integer addresses: the lines ahead may lie past the end of the array.
template <int64_t kBytes, int kWrite>
inline void prefetch_lines(uintptr_t first) {
  for (int64_t byte = 0; byte < kBytes; byte += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(first + byte), kWrite, /*locality=*/3);
  }
}

template <int64_t kGroup, bool kOverwrite, typename Acc, typename Grad>
inline void prefetch_group(const Acc* acc, const Grad* grad) {
  prefetch_lines<kGroup * sizeof(Grad), 0>(reinterpret_cast<uintptr_t>(grad) + kPrefetchAhead * sizeof(Grad));
  if (!kOverwrite) {  // overwrite never reads acc
    prefetch_lines<kGroup * sizeof(Acc), 1>(reinterpret_cast<uintptr_t>(acc) + kPrefetchAhead * sizeof(Acc));
  }
}

// Stochastic stores of a vector of fp32 sums with their elements' random bits (16 per
// lane, in the low half, as V::random_halves gives them); each returns the value as
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
  // kStreaming: acc is stored with non-temporal stores (an overwrite, which never reads
  // acc, to an aligned acc): a line is written without being read first.
  template <bool kOverwrite, bool kNorm, bool kStreaming = false>
  static ChunkResult body(Acc* acc, const Grad* grad, int64_t n, float scale) {
    static_assert(kOverwrite || !kStreaming, "an add reads acc: its lines are in the cache already");
    const typename V::Vec vscale = V::set1(scale);
    typename V::Mask nonfinite = V::empty_mask();
    double norm_sq = 0.0;
    const int64_t vector_end = n - n % V::kWidth;
    int64_t i = 0;
    while (i < vector_end) {
      const int64_t block_end = vector_end - i < kNormBlock ? vector_end : i + kNormBlock;
      typename V::Vec block = V::zero();
      for (; i < block_end; i += V::kWidth) {
        if (i % kPrefetchStride == 0) {
          prefetch_group<kPrefetchStride, kOverwrite>(acc + i, grad + i);
        }
        const typename V::Vec g = V::load(grad + i);
        nonfinite = V::mark_nonfinite(nonfinite, g);
        const typename V::Vec scaled = V::mul(g, vscale);
        const typename V::Vec sum = kOverwrite ? scaled : V::add(V::load(acc + i), scaled);
        const typename V::Vec stored = V::template store<kStreaming>(acc + i, sum);
        if (kNorm) {
          block = V::add(block, V::mul(stored, stored));
        }
      }
      if (kNorm) {
        norm_sq += V::reduce_add(block);
      }
    }
    if (kStreaming) {
      V::end_streaming();  // the streamed lines are ordered before anything written after
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
        prefetch_group<kGroup, kOverwrite>(acc + i, grad + i);
        const PhiloxSets<V, kSets> sets =
            philox_sets<V, kSets>(random.key, random.tensor, static_cast<uint64_t>(random.first_element + i) / 8);
        typename V::IVec bits[4 * kSets];
        for (int s = 0; s < kSets; ++s) {
          V::random_halves(sets.word[0][s], sets.word[1][s], sets.word[2][s], sets.word[3][s], bits + 4 * s);
        }
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

  // bf16 gradients into bf16 buffers (the common case) as pairs: 32-bit lane j holds
  // elements 2j (low half) and 2j + 1 (high half) of grad, of acc and of the Philox word
  // that rounds both (its low and its high half, see stochastic_word). Philox words
  // are used in the order they come, grad and acc widen with one shift or mask per
  // vector, and the two rounded halves merge into one store: about half the vector
  // uops of stochastic_body's loop. Same bits and the same norm (summed in
  // stochastic_body's order); acc may be grad.
  template <bool kOverwrite, bool kNorm>
  static ChunkResult stochastic_pairs_body(c10::BFloat16* acc, const c10::BFloat16* grad, int64_t n, float scale,
                                           const RandomStream& random) {
    using IVec = typename V::IVec;
    constexpr int kSets = V::kPhiloxSets;
    constexpr int64_t kPairVector = 2 * V::kWidth;  // elements in one vector of pairs
    constexpr int64_t kGroup = 8 * V::kPhiloxBlocks * kSets;
    static_assert(V::kPhiloxBlocks * 8 == 2 * kPairVector, "a Philox set fills two vectors of pairs");
    static_assert(kNormBlock % kGroup == 0, "norm blocks hold whole Philox groups");
    if (random.first_element % 8 != 0) {
      return accumulate_range_stochastic(acc, grad, n, scale, kOverwrite, random);
    }
    const typename V::Vec vscale = V::set1(scale);
    // Largest gradient bits seen, as signed and as unsigned 16-bit integers: a gradient
    // is inf or nan iff its bits are at least 0x7F80 (positive) or 0xFF80 (negative).
    IVec signed_max = V::iset1(0);
    IVec unsigned_max = V::iset1(0);
    double norm_sq = 0.0;
    const int64_t group_end = n - n % kGroup;
    int64_t i = 0;
    while (i < group_end) {
      const int64_t block_end = group_end - i < kNormBlock ? group_end : i + kNormBlock;
      typename V::Vec block = V::zero();
      for (; i < block_end; i += kGroup) {
        prefetch_group<kGroup, kOverwrite>(acc + i, grad + i);
        const PhiloxSets<V, kSets> sets =
            philox_sets<V, kSets>(random.key, random.tensor, static_cast<uint64_t>(random.first_element + i) / 8);
        for (int s = 0; s < kSets; ++s) {
          IVec words[2];
          V::random_words(sets.word[0][s], sets.word[1][s], sets.word[2][s], sets.word[3][s], words);
          for (int h = 0; h < 2; ++h) {
            const int64_t k = i + (2 * s + h) * kPairVector;
            const IVec g = V::load_pairs(grad + k);
            signed_max = V::imax_i16(signed_max, g);
            unsigned_max = V::imax_u16(unsigned_max, g);
            typename V::Vec even = V::mul(V::even_of_pairs(g), vscale);
            typename V::Vec odd = V::mul(V::odd_of_pairs(g), vscale);
            if (!kOverwrite) {
              const IVec a = V::load_pairs(acc + k);  // before the store: acc may be grad
              even = V::add(V::even_of_pairs(a), even);
              odd = V::add(V::odd_of_pairs(a), odd);
            }
            V::store_pairs(acc + k, V::round_pairs_stochastic(even, odd, words[h]));
            if (kNorm) {
              for (int64_t half = 0; half < kPairVector; half += V::kWidth) {
                const typename V::Vec stored = V::load(acc + k + half);
                block = V::add(block, V::mul(stored, stored));
              }
            }
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
    return {V::any_nonfinite_bf16(signed_max, unsigned_max) || tail.nonfinite, norm_sq + tail.norm_sq};
  }

  template <bool kOverwrite, bool kNorm>
  static ChunkResult stochastic(Acc* acc, const Grad* grad, int64_t n, float scale, const RandomStream& random) {
    if constexpr (std::is_same_v<Acc, c10::BFloat16> && std::is_same_v<Grad, c10::BFloat16>) {
      return stochastic_pairs_body<kOverwrite, kNorm>(acc, grad, n, scale, random);
    } else {
      return stochastic_body<kOverwrite, kNorm>(acc, grad, n, scale, random);
    }
  }

  static ChunkResult run(void* acc_ptr, const void* grad_ptr, int64_t n, float scale, bool overwrite,
                         bool streaming, bool want_norm, const RandomStream* random) {
    auto* acc = static_cast<Acc*>(acc_ptr);
    const auto* grad = static_cast<const Grad*>(grad_ptr);
    if (random != nullptr) {
      if (overwrite) {
        return want_norm ? stochastic<true, true>(acc, grad, n, scale, *random)
                         : stochastic<true, false>(acc, grad, n, scale, *random);
      }
      return want_norm ? stochastic<false, true>(acc, grad, n, scale, *random)
                       : stochastic<false, false>(acc, grad, n, scale, *random);
    }
    if (overwrite && streaming && reinterpret_cast<uintptr_t>(acc) % (V::kWidth * sizeof(Acc)) == 0) {
      // (A chunk of a tensor that torch allocated is aligned; others take ordinary stores.)
      return want_norm ? body<true, true, true>(acc, grad, n, scale) : body<true, false, true>(acc, grad, n, scale);
    }
    if (overwrite) {
      return want_norm ? body<true, true>(acc, grad, n, scale) : body<true, false>(acc, grad, n, scale);
    }
    return want_norm ? body<false, true>(acc, grad, n, scale) : body<false, false>(acc, grad, n, scale);
  }
};

template <class V, typename Src, typename Dst>
struct VectorScale {
  static void run(const void* src_ptr, void* dst_ptr, int64_t n, float coef, bool streaming) {
    const auto* src = static_cast<const Src*>(src_ptr);
    auto* dst = static_cast<Dst*>(dst_ptr);
    if (streaming && reinterpret_cast<uintptr_t>(dst) % sizeof(Dst) == 0) {
      return run_streaming(src, dst, n, coef);  // (a dst off its elements' alignment never aligns)
    }
    const typename V::Vec vcoef = V::set1(coef);
    const int64_t vector_end = n - n % V::kWidth;
    for (int64_t i = 0; i < vector_end; i += V::kWidth) {
      V::store(dst + i, V::mul(V::load(src + i), vcoef));
    }
    scale_range(src, dst, vector_end, n, coef);
  }

  // Into another tensor than src, with non-temporal stores: dst's lines are written
  // without being read first (an ordinary store reads each line before writing it), so
  // fp32 into bf16 moves 6 bytes per element instead of 8. The src lines are prefetched,
  // as the stores no longer give the loads the memory's attention. Those stores need
  // aligned addresses: the elements before dst's first aligned vector scale one by one.
  static void run_streaming(const Src* src, Dst* dst, int64_t n, float coef) {
    constexpr auto kAlign = static_cast<uintptr_t>(V::kWidth * sizeof(Dst));
    const uintptr_t misaligned = reinterpret_cast<uintptr_t>(dst) % kAlign;
    const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((kAlign - misaligned) % kAlign / sizeof(Dst)));
    scale_range(src, dst, 0, head, coef);
    const typename V::Vec vcoef = V::set1(coef);
    const int64_t vector_end = n - (n - head) % V::kWidth;
    for (int64_t i = head; i < vector_end; i += V::kWidth) {
      prefetch_lines<V::kWidth * sizeof(Src), 0>(reinterpret_cast<uintptr_t>(src + i + kPrefetchAhead));
      V::template store<true>(dst + i, V::mul(V::load(src + i), vcoef));
    }
    V::end_streaming();  // the streamed lines are ordered before anything written after
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
