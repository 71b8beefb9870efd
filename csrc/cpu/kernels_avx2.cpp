// AVX2 + F16C chunk kernels (8 fp32 lanes). Compiled for AVX2 with a target pragma and
// only called after a run-time CPU check, so the rest of the build stays baseline x86-64.
#include "cpu/chunk_kernels.h"  // before the pragma: shared inline code stays baseline

#include <cfloat>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "cpu/vector_kernel.h"

namespace mbfused::cpu {
namespace {

struct Avx2 {
  using Vec = __m256;
  using Mask = __m256;  // lanes of all ones where a non-finite value was seen
  using IVec = __m256i;  // integer lanes (Philox, stochastic rounding)
  static constexpr int64_t kWidth = 8;

  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float x) { return _mm256_set1_ps(x); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }

  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(const c10::BFloat16* p) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
  static Vec load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }

  // Each store returns the value as stored, widened back to fp32 (for norm_sq).
  // kStreaming: a non-temporal store (finalize_'s out=, see VectorScale), to an address
  // aligned to the vector's bytes.
  template <bool kStreaming = false>
  static Vec store(float* p, Vec v) {
    if constexpr (kStreaming) {
      _mm256_stream_ps(p, v);
    } else {
      _mm256_storeu_ps(p, v);
    }
    return v;
  }
  template <bool kStreaming = false>
  static void write(void* p, __m128i bits) {
    if constexpr (kStreaming) {
      _mm_stream_si128(static_cast<__m128i*>(p), bits);
    } else {
      _mm_storeu_si128(static_cast<__m128i*>(p), bits);
    }
  }
  static void end_streaming() { _mm_sfence(); }
  template <bool kStreaming = false>
  static Vec store(c10::BFloat16* p, Vec v) {
    // Round to nearest even like c10::BFloat16; NaN becomes 0x7FC0.
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    write<kStreaming>(p, packed);
    return _mm256_castsi256_ps(_mm256_slli_epi32(rounded, 16));
  }
  template <bool kStreaming = false>
  static Vec store(c10::Half* p, Vec v) {
    const __m128i half = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    write<kStreaming>(p, half);
    return _mm256_cvtph_ps(half);
  }

  // Stochastic rounding to bf16 (mbfused.reference.stochastic_round): the 16 random
  // bits (low halves of `random`) added to the fp32 bits, truncated; NaN becomes 0x7FC0.
  static Vec store_stochastic(c10::BFloat16* p, Vec v, IVec random) {
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(v), random), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    return _mm256_castsi256_ps(_mm256_slli_epi32(rounded, 16));
  }

  // Philox (philox_sets): one block per 64-bit lane, each word in a lane's low half.
  static constexpr int64_t kPhiloxBlocks = 4;
  // Interleaved Philox sets: four measured faster than two (bf16 into bf16, in cache:
  // 0.56 against 0.78 ns per element), some spills to the stack notwithstanding, and
  // keep the vector part of a chunk (whole groups of 128 elements) where it was.
  static constexpr int kPhiloxSets = 4;
  static IVec iset1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static IVec iset1_64(uint64_t x) { return _mm256_set1_epi64x(static_cast<long long>(x)); }
  static void istore(uint32_t* p, IVec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static IVec block_counters(uint64_t first) {
    return _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(first)), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static IVec mul_wide(IVec x, IVec m) { return _mm256_mul_epu32(x, m); }  // 64-bit products of the low halves
  static IVec high_words(IVec x) { return _mm256_srli_epi64(x, 32); }
  // a ^ b ^ c with b ^ c first: in a Philox round a is the multiply's result, the last
  // input to arrive.
  static IVec ixor3(IVec a, IVec b, IVec c) { return _mm256_xor_si256(a, _mm256_xor_si256(b, c)); }
  // The 32 elements' random bits of the 4 blocks: element 8b + u takes 16-bit half u % 2
  // of word u / 2 of block b. Words 0, 1 and words 2, 3 are paired into the 64-bit lanes,
  // so each block's 8 units are one 128-bit half of an unpack of the pairs, in element
  // order; a zero extension puts them in the low halves of the 32-bit lanes.
  static void random_halves(IVec c0, IVec c1, IVec c2, IVec c3, IVec* random) {
    const IVec words01 = _mm256_blend_epi32(c0, _mm256_slli_epi64(c1, 32), 0xAA);
    const IVec words23 = _mm256_blend_epi32(c2, _mm256_slli_epi64(c3, 32), 0xAA);
    const IVec blocks02 = _mm256_unpacklo_epi64(words01, words23);
    const IVec blocks13 = _mm256_unpackhi_epi64(words01, words23);
    random[0] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(blocks02));
    random[1] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(blocks13));
    random[2] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(blocks02, 1));
    random[3] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(blocks13, 1));
  }

  // The 16 Philox words of 4 blocks in element order (block b's words 0-3 are lanes
  // 4b .. 4b + 3, blocks 0-1 in random[0], 2-3 in random[1]): lane j rounds the pair of
  // elements 2j, 2j + 1 (stochastic_pairs_body).
  static void random_words(IVec c0, IVec c1, IVec c2, IVec c3, IVec* random) {
    const IVec words01 = _mm256_blend_epi32(c0, _mm256_slli_epi64(c1, 32), 0xAA);
    const IVec words23 = _mm256_blend_epi32(c2, _mm256_slli_epi64(c3, 32), 0xAA);
    const IVec blocks02 = _mm256_unpacklo_epi64(words01, words23);
    const IVec blocks13 = _mm256_unpackhi_epi64(words01, words23);
    random[0] = _mm256_permute2x128_si256(blocks02, blocks13, 0x20);
    random[1] = _mm256_permute2x128_si256(blocks02, blocks13, 0x31);
  }

  // bf16 pairs (stochastic_pairs_body): 16 bf16 values as 8 32-bit lanes, element 2j
  // in the low half of lane j, element 2j + 1 in the high half.
  static IVec load_pairs(const c10::BFloat16* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store_pairs(c10::BFloat16* p, IVec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static Vec even_of_pairs(IVec v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
  static Vec odd_of_pairs(IVec v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static IVec imax_i16(IVec a, IVec b) { return _mm256_max_epi16(a, b); }
  static IVec imax_u16(IVec a, IVec b) { return _mm256_max_epu16(a, b); }
  static bool any_nonfinite_bf16(IVec signed_max, IVec unsigned_max) {
    const IVec positive = _mm256_cmpgt_epi16(signed_max, _mm256_set1_epi16(0x7F7F));
    const IVec negative_floor = _mm256_set1_epi16(static_cast<short>(0xFF80));
    const IVec negative = _mm256_cmpeq_epi16(_mm256_max_epu16(unsigned_max, negative_floor), unsigned_max);
    return _mm256_movemask_epi8(_mm256_or_si256(positive, negative)) != 0;
  }
  // Stochastic rounding of the pairs' fp32 sums with their Philox words (even elements
  // take the low halves, odd elements the high halves), packed back into pairs. NaN
  // becomes 0x7FC00000 before the random bits are added, hence 0x7FC0.
  static IVec round_pairs_stochastic(Vec even, Vec odd, IVec words) {
    const IVec even_bits = _mm256_add_epi32(canonical_nan(even), _mm256_and_si256(words, _mm256_set1_epi32(0xFFFF)));
    const IVec odd_bits = _mm256_add_epi32(canonical_nan(odd), _mm256_srli_epi32(words, 16));
    return _mm256_blend_epi16(odd_bits, _mm256_srli_epi32(even_bits, 16), 0x55);
  }
  static IVec canonical_nan(Vec v) {
    const Vec nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_castps_si256(_mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan));
  }

  static Mask empty_mask() { return _mm256_setzero_ps(); }
  static Mask mark_nonfinite(Mask seen, Vec g) {
    // !(|g| <= FLT_MAX) is true exactly for inf and nan.
    const Vec magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g);
    return _mm256_or_ps(seen, _mm256_cmp_ps(magnitude, _mm256_set1_ps(FLT_MAX), _CMP_NLE_UQ));
  }
  static bool any(Mask m) { return _mm256_movemask_ps(m) != 0; }
  static float reduce_add(Vec v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
  }
};

}  // namespace

const KernelTable& avx2_kernels() {
  static const KernelTable table = VectorKernels<Avx2>::table();
  return table;
}

}  // namespace mbfused::cpu

#pragma GCC pop_options
#else
namespace mbfused::cpu {
const KernelTable& avx2_kernels() { return scalar_kernels(); }
}  // namespace mbfused::cpu
#endif
