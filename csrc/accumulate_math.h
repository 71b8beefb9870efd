// Per-element math of accumulate_ and finalize_, shared by the CPU and the CUDA kernels.
//
// This is the single definition of the semantics: the CPU scalar path and the CUDA
// kernels call these functions, and the vectorised CPU paths are tested bit for bit
// against them, so CPU tests execute exactly the arithmetic the GPU runs.
//
//   acc <- round_to<Acc>(overwrite ? float(grad) * scale : float(acc) + float(grad) * scale)
//
// The product and the sum are rounded separately (no fused multiply-add), matching
// PyTorch's `acc.float() + grad.float() * scale`; the CUDA build passes --fmad=false
// and the C++ build -ffp-contract=off so the compilers keep it that way.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mbfused {

enum class ScalarKind : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };
constexpr int kNumScalarKinds = 3;

template <typename T>
C10_HOST_DEVICE inline float to_float(T value) {
  return static_cast<float>(value);
}

template <typename T>
C10_HOST_DEVICE inline T from_float(float value) {
  // c10::BFloat16 and c10::Half round to nearest even; NaN stays NaN.
  return static_cast<T>(value);
}

// A value is non-finite when it is inf or nan; written without isfinite() so that it
// behaves the same on host and device and under any math flags.
C10_HOST_DEVICE inline bool is_nonfinite(float value) {
  const float magnitude = value < 0.0f ? -value : value;
  return !(magnitude <= 3.402823466e+38f);
}

C10_HOST_DEVICE inline float accumulated(float acc, float grad, float scale, bool overwrite) {
  const float scaled = grad * scale;
  return overwrite ? scaled : acc + scaled;
}

// Updates one accumulator element; returns the stored value as fp32 (its square feeds
// norm_sq) and raises `nonfinite` when the gradient element is inf or nan.
template <typename Acc, typename Grad>
C10_HOST_DEVICE inline float accumulate_element(
    Acc& acc, Grad grad, float scale, bool overwrite, bool& nonfinite) {
  const float g = to_float(grad);
  nonfinite |= is_nonfinite(g);
  const Acc stored = from_float<Acc>(accumulated(to_float(acc), g, scale, overwrite));
  acc = stored;
  return to_float(stored);
}

// Stochastic rounding of a finite or non-finite fp32 value with a 32-bit random word
// (the definition, with its edge cases, is in mbfused/reference.py: stochastic_round):
// away from zero iff the remainder, as a 32-bit fraction of the gap, plus `random`
// reaches 2^32. inf and NaN convert as in round-to-nearest.
C10_HOST_DEVICE inline uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

C10_HOST_DEVICE inline float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

template <typename T>
C10_HOST_DEVICE inline T stochastic_from_float(float value, uint32_t random);

template <>
C10_HOST_DEVICE inline float stochastic_from_float<float>(float value, uint32_t) {
  return value;
}

template <>
C10_HOST_DEVICE inline c10::BFloat16 stochastic_from_float<c10::BFloat16>(float value, uint32_t random) {
  if (is_nonfinite(value)) {
    return from_float<c10::BFloat16>(value);
  }
  // Carries out of the low 16 bits round away from zero; from the largest finite bf16
  // the carry reaches the exponent of inf (the sign bit is never reached).
  const uint32_t bits = float_bits(value) + (random >> 16);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

template <>
C10_HOST_DEVICE inline c10::Half stochastic_from_float<c10::Half>(float value, uint32_t random) {
  if (is_nonfinite(value)) {
    return from_float<c10::Half>(value);
  }
  const uint32_t bits = float_bits(value);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  const uint32_t exponent = magnitude >> 23;
  if (exponent >= 113) {
    // fp16 normal range and beyond: the truncated fp32 value is an fp16 value, or at
    // least 65536, which converts to inf.
    return from_float<c10::Half>(float_from_bits((bits + (random >> 19)) & ~0x1FFFu));
  }
  // Subnormal range: |x| = significand * 2^-shift steps of 2^-24.
  const uint32_t significand = (magnitude & 0x7FFFFFu) | (exponent > 0 ? 0x800000u : 0u);
  const uint32_t shift = 126 - (exponent > 0 ? exponent : 1);  // 14 .. 125
  uint32_t steps = shift < 32 ? significand >> shift : 0u;
  const uint32_t remainder = significand - (shift < 32 ? steps << shift : 0u);
  const uint32_t fraction = shift <= 32 ? static_cast<uint32_t>(static_cast<uint64_t>(remainder) << (32 - shift))
                                        : (shift - 32 < 32 ? remainder >> (shift - 32) : 0u);
  steps += fraction > ~random ? 1u : 0u;
  return c10::Half(static_cast<uint16_t>(steps | ((bits >> 16) & 0x8000u)), c10::Half::from_bits());
}

// accumulate_element with stochastic rounding of the stored value (fp32 acc: as is).
template <typename Acc, typename Grad>
C10_HOST_DEVICE inline float accumulate_element_stochastic(
    Acc& acc, Grad grad, float scale, bool overwrite, bool& nonfinite, uint32_t random) {
  const float g = to_float(grad);
  nonfinite |= is_nonfinite(g);
  const Acc stored = stochastic_from_float<Acc>(accumulated(to_float(acc), g, scale, overwrite), random);
  acc = stored;
  return to_float(stored);
}

// finalize_'s scaling: one element of dst <- cast(src * coef).
template <typename Dst, typename Src>
C10_HOST_DEVICE inline Dst scaled_element(Src src, float coef) {
  return from_float<Dst>(to_float(src) * coef);
}

// finalize_'s coefficient, in fp32, rounded step by step as the reference
// (mbfused.reference.window_coefficient) and torch.nn.utils.clip_grad_norm_ do:
// total_norm = sqrt(sum_sq) * |inv_scale| with a correctly rounded sqrt (|-0| is +0: a
// norm is never negative zero), and
// coef = inv_scale * min(clip, 1) with clip = max_norm / (total_norm + 1e-6), which
// PyTorch evaluates as reciprocal(total_norm + 1e-6) * max_norm (a plain division
// differs in the last bit for about a quarter of the norms). min() is written so that
// a nan clip stays nan, as torch.clamp keeps it.
struct FinalizeCoefficient {
  float total_norm;
  float coef;
};

C10_HOST_DEVICE inline FinalizeCoefficient finalize_coefficient(
    float sum_sq, float inv_scale, bool has_max_norm, float max_norm) {
  const float total_norm = sqrtf(sum_sq) * fabsf(inv_scale);
  float coef = inv_scale;
  if (has_max_norm) {
    const float clip = (1.0f / (total_norm + 1e-6f)) * max_norm;
    coef = inv_scale * (1.0f < clip ? 1.0f : clip);
  }
  return {total_norm, coef};
}

}  // namespace mbfused
