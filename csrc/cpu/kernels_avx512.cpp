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
