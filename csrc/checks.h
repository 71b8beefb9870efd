// Argument validation shared by the compiled backends. Everything is checked before
// anything is written; messages name the argument and its index.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace mbfused {

// Validates accumulate_'s arguments (see DESIGN.md, "accumulate_" and "Errors").
void check_accumulate_args(
    c10::ArrayRef<at::Tensor> acc, c10::ArrayRef<at::Tensor> grads,
    const std::optional<at::Tensor>& scale_tensor, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& norm_sq, const std::optional<at::Tensor>& seed_tensor);

// Validates finalize_'s arguments; `out` is empty for the in-place form.
void check_finalize_args(
    c10::ArrayRef<at::Tensor> acc, const std::optional<at::Tensor>& inv_scale_tensor,
    std::optional<double> max_norm, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& norm_sq, c10::ArrayRef<at::Tensor> out,
    const std::optional<at::Tensor>& seed_tensor);

// Validates wgrad_accumulate_'s arguments (see DESIGN.md, "wgrad_accumulate_").
void check_wgrad_args(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input,
                      const std::optional<at::Tensor>& scale_tensor);

}  // namespace mbfused
