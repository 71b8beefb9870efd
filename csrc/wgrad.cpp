// wgrad_accumulate_ on CPU and CUDA tensors: main_grad (fp32) += scale * grad_output^T @ input,
// the product accumulated in fp32 by the platform's GEMM (cuBLAS, or the CPU BLAS).
//
// CUDA: two 16-bit operands of one dtype go straight to cuBLAS with an fp32 output and
// beta = 1 (aten's addmm with out_dtype), which adds into main_grad in the GEMM's
// epilogue: no temporary, no 16-bit weight gradient, one pass over main_grad.
// CPU: the CPU BLAS multiplies fp32 matrices, so 16-bit operands are widened to fp32 a
// block of tokens at a time: the temporaries stay small however many tokens there are.
#include "checks.h"

#include <ATen/ops/addcmul.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace mbfused {
namespace {

// Elements of fp32 operand copies per block on CPU (two blocks' worth: 64 MB at most).
constexpr int64_t kCpuBlockElements = int64_t{8} << 20;

at::Tensor as_fp32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// A GEMM's alpha stands for the reference's multiply after the product only when the
// scale is finite and nonzero: a BLAS skips the product for alpha = 0 (inf and nan of
// the operands are lost) and the CPU one ignored a nan alpha (5000 where the reference
// gives nan). With no tokens there is no GEMM: the product is zeros, and 0 * scale keeps
// the reference's signs and nans. Other scales go through an explicit fp32 product.
bool scale_fits_alpha(float scale, int64_t tokens) {
  return tokens > 0 && std::isfinite(scale) && scale != 0.0f;
}

// dst <- (overwrite ? 0 : dst) + alpha * a^T @ x on the CPU BLAS, with a [tokens, out] and
// x [tokens, in].
void gemm_cpu(const at::Tensor& dst, const at::Tensor& a, const at::Tensor& x, float alpha, bool overwrite) {
  const int64_t tokens = a.size(0);
  if (tokens == 0) {
    if (overwrite) {
      dst.zero_();
    }
    return;
  }
  const bool widen = a.scalar_type() != at::kFloat || x.scalar_type() != at::kFloat;
  const int64_t block = widen ? std::max<int64_t>(1, kCpuBlockElements / (a.size(1) + x.size(1))) : tokens;
  at::Tensor out = dst;  // addmm_out takes the output by non-const reference
  for (int64_t first = 0; first < tokens; first += block) {
    const int64_t rows = std::min(block, tokens - first);
    // beta = 0 on the first block of an overwrite: dst is not read (NaN discarded).
    const double beta = (overwrite && first == 0) ? 0.0 : 1.0;
    at::addmm_out(out, dst, as_fp32(a.narrow(0, first, rows)).t(), as_fp32(x.narrow(0, first, rows)), beta,
                  alpha);
  }
}

void wgrad_cpu(const at::Tensor& main_grad, const at::Tensor& a, const at::Tensor& x, float scale, bool overwrite) {
  if (scale_fits_alpha(scale, a.size(0))) {
    gemm_cpu(main_grad, a, x, scale, overwrite);
    return;
  }
  // The reference's order: the product, times scale, then added (or written).
  at::Tensor product = at::empty_like(main_grad);
  gemm_cpu(product, a, x, 1.0f, /*overwrite=*/true);
  product.mul_(scale);
  if (overwrite) {
    main_grad.copy_(product);
  } else {
    main_grad.add_(product);
  }
}

void wgrad_cuda(const at::Tensor& main_grad, const at::Tensor& a, const at::Tensor& x, double scale,
                const std::optional<at::Tensor>& scale_tensor, bool overwrite) {
  // One 16-bit dtype: cuBLAS reads it directly and writes fp32. Otherwise fp32 operands.
  const bool direct = a.scalar_type() == x.scalar_type() && a.scalar_type() != at::kFloat;
  const at::Tensor lhs = direct ? a.t() : as_fp32(a).t();
  const at::Tensor rhs = direct ? x : as_fp32(x);
  at::Tensor out = main_grad;
  if (!scale_tensor.has_value() && scale_fits_alpha(static_cast<float>(scale), a.size(0))) {
    const double beta = overwrite ? 0.0 : 1.0;
    if (direct) {
      at::addmm_out(out, main_grad, lhs, rhs, at::kFloat, beta, scale);
    } else {
      at::addmm_out(out, main_grad, lhs, rhs, beta, scale);
    }
    return;
  }
  // A scale on the device (as an alpha it would cost a host sync), or one no alpha stands
  // for (scale_fits_alpha): one fp32 product, then one fused pass main_grad (+)= product * scale.
  // 0-d: a 1-element scale of any shape ([1], [1, 1, 1]) must not broadcast main_grad's.
  const at::Tensor product = direct ? at::mm(lhs, rhs, at::kFloat) : at::mm(lhs, rhs);
  const at::Tensor s = scale_tensor.has_value()
                           ? scale_tensor->reshape({})
                           : at::full(at::IntArrayRef{}, static_cast<float>(scale), main_grad.options());
  if (overwrite) {
    at::mul_out(out, product, s);
  } else {
    out.addcmul_(product, s);
  }
}

void wgrad_accumulate_native(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input,
                             double scale, const std::optional<at::Tensor>& scale_tensor, bool overwrite) {
  check_wgrad_args(main_grad, grad_output, input, scale_tensor);
  if (main_grad.numel() == 0) {
    return;
  }
  const at::Tensor a = grad_output.reshape({-1, main_grad.size(0)});
  const at::Tensor x = input.reshape({-1, main_grad.size(1)});
  if (main_grad.is_cuda()) {
    wgrad_cuda(main_grad, a, x, scale, scale_tensor, overwrite);
  } else {
    TORCH_CHECK_VALUE(main_grad.is_cpu(), "wgrad_accumulate_ runs CPU and CUDA tensors; main_grad is on ",
                      main_grad.device());
    wgrad_cpu(main_grad, a, x, scale_tensor.has_value() ? scale_tensor->item<float>() : static_cast<float>(scale),
              overwrite);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mbfused, CPU, m) {
  m.impl("_wgrad_accumulate_native_", &wgrad_accumulate_native);
}

TORCH_LIBRARY_IMPL(mbfused, CUDA, m) {
  m.impl("_wgrad_accumulate_native_", &wgrad_accumulate_native);
}

}  // namespace mbfused
