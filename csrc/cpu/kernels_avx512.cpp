// AVX-512 chunk kernels (16 fp32 lanes). Compiled for AVX-512 with a target pragma and
// only called after a run-time CPU check, so the rest of the build stays baseline x86-64.
#include "cpu/chunk_kernels.h"  // before the pragma: shared inline code stays baseline

#include <cfloat>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

#include "cpu/vector_kernel.h"

namespace mbfused::cpu {
namespace {

struct Avx512 {
  using Vec = __m512;
  using Mask = __mmask16;
  using IVec = __m512i;  // integer lanes (Philox, stochastic rounding)
  static constexpr int64_t kWidth = 16;

  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float x) { return _mm512_set1_ps(x); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }

  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const c10::BFloat16* p) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
  static Vec load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  // Each store returns the value as stored, widened back to fp32 (for norm_sq).
  // kStreaming: a non-temporal store (finalize_'s out=, see VectorScale), to an address
  // aligned to the vector's bytes.
  template <bool kStreaming = false>
  static Vec store(float* p, Vec v) {
    if constexpr (kStreaming) {
      _mm512_stream_ps(p, v);
    } else {
      _mm512_storeu_ps(p, v);
    }
    return v;
  }
  template <bool kStreaming = false>
  static void write(void* p, __m256i bits) {
    if constexpr (kStreaming) {
      _mm256_stream_si256(static_cast<__m256i*>(p), bits);
    } else {
      _mm256_storeu_si256(static_cast<__m256i*>(p), bits);
    }
  }
  static void end_streaming() { _mm_sfence(); }
  template <bool kStreaming = false>
  static Vec store(c10::BFloat16* p, Vec v) {
    // Round to nearest even like c10::BFloat16; NaN becomes 0x7FC0.
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
    write<kStreaming>(p, _mm512_cvtepi32_epi16(rounded));
    return _mm512_castsi512_ps(_mm512_slli_epi32(rounded, 16));
  }
  template <bool kStreaming = false>
  static Vec store(c10::Half* p, Vec v) {
    const __m256i half = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    write<kStreaming>(p, half);
    return _mm512_cvtph_ps(half);
  }

  // Stochastic rounding to bf16 (mbfused.reference.stochastic_round): the 16 random
  // bits (low halves of `random`) added to the fp32 bits, truncated; NaN becomes 0x7FC0.
  static Vec store_stochastic(c10::BFloat16* p, Vec v, IVec random) {
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(v), random), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
    return _mm512_castsi512_ps(_mm512_slli_epi32(rounded, 16));
  }

  // Philox (philox_sets): one block per 64-bit lane, each word in a lane's low half.
  static constexpr int64_t kPhiloxBlocks = 8;
  // Interleaved Philox sets: a round is a 7-cycle chain (multiply 5, shift, ternlog) of
  // 3 cycles of p0/p5 work per set, so three sets keep both ports busy; four keep a
  // group a whole number of norm blocks (and the vector part of a chunk, whole groups
  // of 256 elements, where it was).
  static constexpr int kPhiloxSets = 4;
  static IVec iset1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static IVec iset1_64(uint64_t x) { return _mm512_set1_epi64(static_cast<long long>(x)); }
  static void istore(uint32_t* p, IVec v) { _mm512_storeu_si512(p, v); }
  static IVec block_counters(uint64_t first) {
    return _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first)), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static IVec mul_wide(IVec x, IVec m) { return _mm512_mul_epu32(x, m); }  // 64-bit products of the low halves
  static IVec high_words(IVec x) { return _mm512_srli_epi64(x, 32); }
  static IVec ixor3(IVec a, IVec b, IVec c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }  // a ^ b ^ c
  // The 64 elements' random bits of the 8 blocks: element 8b + u takes 16-bit half u % 2
  // of word u / 2 of block b. Words 0, 1 (elements 0-3) and words 2, 3 (elements 4-7)
  // are paired into the 64-bit lanes, so each 64-bit lane holds four elements' units in
  // element order; a qword permute puts the units of vector 2p (elements 16 * 2p on) in
  // the low and those of vector 2p + 1 in the high quarters of the 128-bit lanes, and
  // unpacking with zero widens them to 32 bits (6 uops for the 4 vectors; 4 word
  // permutes measured slower).
  static void random_halves(IVec c0, IVec c1, IVec c2, IVec c3, IVec* random) {
    const IVec words01 = _mm512_mask_shuffle_epi32(c0, 0xAAAA, c1, _MM_PERM_CDAB);
    const IVec words23 = _mm512_mask_shuffle_epi32(c2, 0xAAAA, c3, _MM_PERM_CDAB);
    const IVec zero = _mm512_setzero_si512();
    const IVec vectors01 = _mm512_permutex2var_epi64(words01, _mm512_setr_epi64(0, 2, 8, 10, 1, 3, 9, 11), words23);
    const IVec vectors23 = _mm512_permutex2var_epi64(words01, _mm512_setr_epi64(4, 6, 12, 14, 5, 7, 13, 15), words23);
    random[0] = _mm512_unpacklo_epi16(vectors01, zero);
    random[1] = _mm512_unpackhi_epi16(vectors01, zero);
    random[2] = _mm512_unpacklo_epi16(vectors23, zero);
    random[3] = _mm512_unpackhi_epi16(vectors23, zero);
  }
  // The 32 Philox words of 8 blocks in element order (block b's words 0-3 are lanes
  // 4b .. 4b + 3, blocks 0-3 in random[0], 4-7 in random[1]): lane j rounds the pair of
  // elements 2j, 2j + 1 (stochastic_pairs_body).
  static void random_words(IVec c0, IVec c1, IVec c2, IVec c3, IVec* random) {
    const IVec words01 = _mm512_mask_shuffle_epi32(c0, 0xAAAA, c1, _MM_PERM_CDAB);
    const IVec words23 = _mm512_mask_shuffle_epi32(c2, 0xAAAA, c3, _MM_PERM_CDAB);
    random[0] = _mm512_permutex2var_epi64(words01, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), words23);
    random[1] = _mm512_permutex2var_epi64(words01, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), words23);
  }

  // bf16 pairs (stochastic_pairs_body): 32 bf16 values as 16 32-bit lanes, element 2j
  // in the low half of lane j, element 2j + 1 in the high half.
  static IVec load_pairs(const c10::BFloat16* p) { return _mm512_loadu_si512(p); }
  static void store_pairs(c10::BFloat16* p, IVec v) { _mm512_storeu_si512(p, v); }
  static Vec even_of_pairs(IVec v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
  static Vec odd_of_pairs(IVec v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static IVec imax_i16(IVec a, IVec b) { return _mm512_max_epi16(a, b); }
  static IVec imax_u16(IVec a, IVec b) { return _mm512_max_epu16(a, b); }
  static bool any_nonfinite_bf16(IVec signed_max, IVec unsigned_max) {
    return _mm512_cmpge_epi16_mask(signed_max, _mm512_set1_epi16(0x7F80)) != 0 ||
           _mm512_cmpge_epu16_mask(unsigned_max, _mm512_set1_epi16(static_cast<short>(0xFF80))) != 0;
  }
  // Stochastic rounding of the pairs' fp32 sums with their Philox words (even elements
  // take the low halves, odd elements the high halves), packed back into pairs. Each
  // costs p0/p5 uops in the port-bound loop, hence: a NaN lane takes 0x7FC00000 (so
  // 0x7FC0) in place of sum plus random bits in one masked add, and the even results'
  // high halves move into the odd results' low halves in one masked byte shuffle.
  static IVec round_pairs_stochastic(Vec even, Vec odd, IVec words) {
    const IVec nan = _mm512_set1_epi32(0x7FC00000);
    const IVec even_bits = _mm512_mask_add_epi32(nan, _mm512_cmp_ps_mask(even, even, _CMP_ORD_Q),
                                                 _mm512_castps_si512(even),
                                                 _mm512_and_si512(words, _mm512_set1_epi32(0xFFFF)));
    const IVec odd_bits = _mm512_mask_add_epi32(nan, _mm512_cmp_ps_mask(odd, odd, _CMP_ORD_Q),
                                                _mm512_castps_si512(odd), _mm512_srli_epi32(words, 16));
    const IVec high_half_down = _mm512_set4_epi32(0x0F0E, 0x0B0A, 0x0706, 0x0302);  // bytes 2, 3 of each lane
    return _mm512_mask_shuffle_epi8(odd_bits, 0x3333333333333333ull, even_bits, high_half_down);
  }

  static Mask empty_mask() { return 0; }
  static Mask mark_nonfinite(Mask seen, Vec g) {
    // !(|g| <= FLT_MAX) is true exactly for inf and nan.
    return seen | _mm512_cmp_ps_mask(_mm512_abs_ps(g), _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ);
  }
  static bool any(Mask m) { return m != 0; }
  static float reduce_add(Vec v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace

const KernelTable& avx512_kernels() {
  static const KernelTable table = VectorKernels<Avx512>::table();
  return table;
}

}  // namespace mbfused::cpu

#pragma GCC pop_options
#else
namespace mbfused::cpu {
const KernelTable& avx512_kernels() { return scalar_kernels(); }
}  // namespace mbfused::cpu
#endif
