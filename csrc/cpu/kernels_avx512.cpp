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
  using IVec = __m512i;  // 32-bit integer lanes (Philox, stochastic rounding)
  static constexpr int64_t kWidth = 16;
  static constexpr int kPhiloxPasses = 2;  // interleaved Philox passes (4 measured no faster)

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
  static Vec store(float* p, Vec v) {
    _mm512_storeu_ps(p, v);
    return v;
  }
  static Vec store(c10::BFloat16* p, Vec v) {
    // Round to nearest even like c10::BFloat16; NaN becomes 0x7FC0.
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
    return _mm512_castsi512_ps(_mm512_slli_epi32(rounded, 16));
  }
  static Vec store(c10::Half* p, Vec v) {
    const __m256i half = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), half);
    return _mm512_cvtph_ps(half);
  }

  // Stochastic rounding to bf16 (mbfused.reference.stochastic_round): the high 16 bits
  // of the random word added to the fp32 bits, truncated; NaN becomes 0x7FC0.
  static Vec store_stochastic(c10::BFloat16* p, Vec v, IVec random) {
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(v), _mm512_srli_epi32(random, 16)), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
    return _mm512_castsi512_ps(_mm512_slli_epi32(rounded, 16));
  }

  // 32-bit integer lanes for Philox.
  static IVec iset1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static IVec iload(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static IVec iload_high_halves(const uint16_t* p) {  // 16-bit values into the lanes' high halves
    return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  }
  static void istore(uint32_t* p, IVec v) { _mm512_storeu_si512(p, v); }
  static IVec ixor3(IVec a, IVec b, IVec c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }  // a ^ b ^ c
  static IVec iadd(IVec a, IVec b) { return _mm512_add_epi32(a, b); }
  static IVec iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  // words[4 * j + w] = c_w[j]: a 4x4 transpose within each 128-bit lane (r_i: block
  // 4L + i in lane L), then a 4x4 transpose of the lanes across r_0..r_3.
  static void store_transposed(uint32_t* words, IVec c0, IVec c1, IVec c2, IVec c3) {
    const IVec t0 = _mm512_unpacklo_epi32(c0, c1);
    const IVec t1 = _mm512_unpackhi_epi32(c0, c1);
    const IVec t2 = _mm512_unpacklo_epi32(c2, c3);
    const IVec t3 = _mm512_unpackhi_epi32(c2, c3);
    const IVec r0 = _mm512_unpacklo_epi64(t0, t2);
    const IVec r1 = _mm512_unpackhi_epi64(t0, t2);
    const IVec r2 = _mm512_unpacklo_epi64(t1, t3);
    const IVec r3 = _mm512_unpackhi_epi64(t1, t3);
    const IVec u0 = _mm512_shuffle_i32x4(r0, r1, _MM_SHUFFLE(1, 0, 1, 0));
    const IVec u1 = _mm512_shuffle_i32x4(r2, r3, _MM_SHUFFLE(1, 0, 1, 0));
    const IVec u2 = _mm512_shuffle_i32x4(r0, r1, _MM_SHUFFLE(3, 2, 3, 2));
    const IVec u3 = _mm512_shuffle_i32x4(r2, r3, _MM_SHUFFLE(3, 2, 3, 2));
    istore(words, _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)));
    istore(words + 16, _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
    istore(words + 32, _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(2, 0, 2, 0)));
    istore(words + 48, _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // hi:lo = x * m per lane (mul_epu32 multiplies the even lanes; odd lanes shifted down).
  static void mulhilo(IVec x, uint32_t m, IVec& hi, IVec& lo) {
    const IVec vm = iset1(m);
    const IVec even = _mm512_mul_epu32(x, vm);
    const IVec odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), vm);
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
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
