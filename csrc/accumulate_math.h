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
