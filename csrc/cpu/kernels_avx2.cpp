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
  using IVec = __m256i;  // 32-bit integer lanes (Philox, stochastic rounding)
  static constexpr int64_t kWidth = 8;
  static constexpr int kPhiloxPasses = 2;  // interleaved Philox passes (16 ymm registers hold two)

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
  static Vec store(float* p, Vec v) {
    _mm256_storeu_ps(p, v);
    return v;
  }
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
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    return _mm256_castsi256_ps(_mm256_slli_epi32(rounded, 16));
  }
  static Vec store(c10::Half* p, Vec v) {
    const __m128i half = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), half);
    return _mm256_cvtph_ps(half);
  }

  // Stochastic rounding to bf16 (mbfused.reference.stochastic_round): the high 16 bits
  // of the random word added to the fp32 bits, truncated; NaN becomes 0x7FC0.
  static Vec store_stochastic(c10::BFloat16* p, Vec v, IVec random) {
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(v), _mm256_srli_epi32(random, 16)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    return _mm256_castsi256_ps(_mm256_slli_epi32(rounded, 16));
  }

  // 32-bit integer lanes for Philox.
  static IVec iset1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static IVec iload(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static IVec iload_high_halves(const uint16_t* p) {  // 16-bit values into the lanes' high halves
    return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  }
  static void istore(uint32_t* p, IVec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static IVec ixor3(IVec a, IVec b, IVec c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static IVec iadd(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
  static IVec iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  // words[4 * j + w] = c_w[j]: a 4x4 transpose within each 128-bit half (r_i: block
  // i in the low half, block 4 + i in the high half), then the halves in block order.
  static void store_transposed(uint32_t* words, IVec c0, IVec c1, IVec c2, IVec c3) {
    const IVec t0 = _mm256_unpacklo_epi32(c0, c1);
    const IVec t1 = _mm256_unpackhi_epi32(c0, c1);
    const IVec t2 = _mm256_unpacklo_epi32(c2, c3);
    const IVec t3 = _mm256_unpackhi_epi32(c2, c3);
    const IVec r0 = _mm256_unpacklo_epi64(t0, t2);
    const IVec r1 = _mm256_unpackhi_epi64(t0, t2);
    const IVec r2 = _mm256_unpacklo_epi64(t1, t3);
    const IVec r3 = _mm256_unpackhi_epi64(t1, t3);
    istore(words, _mm256_permute2x128_si256(r0, r1, 0x20));
    istore(words + 8, _mm256_permute2x128_si256(r2, r3, 0x20));
    istore(words + 16, _mm256_permute2x128_si256(r0, r1, 0x31));
    istore(words + 24, _mm256_permute2x128_si256(r2, r3, 0x31));
  }
  // hi:lo = x * m per lane (mul_epu32 multiplies the even lanes; odd lanes shifted down).
  static void mulhilo(IVec x, uint32_t m, IVec& hi, IVec& lo) {
    const IVec vm = iset1(m);
    const IVec even = _mm256_mul_epu32(x, vm);
    const IVec odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), vm);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
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
