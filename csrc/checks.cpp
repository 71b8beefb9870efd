#include "checks.h"

#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

namespace mbfused {
namespace {

std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {
      std::ostringstream out;
      out << "torch." << dtype;
      return out.str();
    }
  }
}

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out << (i ? ", " : "") << sizes[i];
  }
  out << "]";
  return out.str();
}

// Names a list element in messages, e.g. grads[3]. Messages are only formatted when a
// check fails, so validating thousands of tensors builds no strings.
struct Name {
  const char* list;
  size_t index;
};

std::ostream& operator<<(std::ostream& out, const Name& name) {
  if (name.index == SIZE_MAX) {
    return out << name.list;
  }
  return out << name.list << "[" << name.index << "]";
}

bool supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

void check_list_tensor(const at::Tensor& t, const Name& label, const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), label, " is undefined");
  TORCH_CHECK_TYPE(supported_dtype(t.scalar_type()), label, " has dtype ", dtype_name(t.scalar_type()),
                   "; supported dtypes are torch.float32, torch.bfloat16 and torch.float16");
  TORCH_CHECK_VALUE(t.device() == device, label, " is on ", t.device(), " but acc[0] is on ", device);
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, label, " must be a dense (strided) tensor");
  TORCH_CHECK_VALUE(t.is_contiguous(), label, " is not contiguous (sizes ", shape_str(t.sizes()),
                    ", strides ", shape_str(t.strides()), "); pass a contiguous tensor");
}

void check_state_tensor(const std::optional<at::Tensor>& t, const char* label, const at::Device& device) {
  if (!t.has_value()) {
    return;
  }
  TORCH_CHECK_VALUE(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == device,
                    label, " must be a 1-element torch.float32 tensor on ", device, ", got shape ",
                    shape_str(t->sizes()), ", dtype ", dtype_name(t->scalar_type()), " on ", t->device());
  TORCH_CHECK_VALUE(t->is_contiguous(), label, " must be contiguous");
}

void check_no_grad(const at::Tensor& t, const Name& label) {
  TORCH_CHECK_VALUE(!(c10::GradMode::is_enabled() && t.requires_grad()), label,
                    " requires grad while grad mode is enabled; call under torch.no_grad() or "
                    "pass detached tensors");
}

// A byte range of a tensor's memory, tagged for the error message.
struct Span {
  uintptr_t begin;
  uintptr_t end;
  Name label;
  bool written;
};

void add_span(std::vector<Span>& spans, const at::Tensor& t, Name label, bool written) {
  if (t.numel() == 0) {
    return;
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  spans.push_back({begin, begin + static_cast<uintptr_t>(t.numel() * t.element_size()), label, written});
}

// Written tensors must not share memory with any other tensor of the call; reading
// the same memory twice (two grads that alias) is fine.
void check_no_overlap(std::vector<Span> spans) {
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  // Sweep in address order, remembering the span that reaches furthest (and the
  // furthest-reaching written one); any later span starting below its end overlaps it.
  const Span* furthest = nullptr;
  const Span* furthest_written = nullptr;
  for (const Span& span : spans) {
    if (span.written && furthest && span.begin < furthest->end) {
      TORCH_CHECK_VALUE(false, span.label, " overlaps ", furthest->label, " in memory");
    }
    if (!span.written && furthest_written && span.begin < furthest_written->end) {
      TORCH_CHECK_VALUE(false, span.label, " overlaps ", furthest_written->label, " in memory");
    }
    if (!furthest || span.end > furthest->end) {
      furthest = &span;
    }
    if (span.written && (!furthest_written || span.end > furthest_written->end)) {
      furthest_written = &span;
    }
  }
}

}  // namespace

void check_accumulate_args(
    c10::ArrayRef<at::Tensor> acc, c10::ArrayRef<at::Tensor> grads,
    const std::optional<at::Tensor>& scale_tensor, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& norm_sq) {
  TORCH_CHECK_VALUE(acc.size() == grads.size(), "acc has ", acc.size(), " tensors but grads has ",
                    grads.size());
  if (acc.empty()) {
    return;
  }
  const at::Device device = acc[0].device();
  std::vector<Span> spans;
  spans.reserve(2 * acc.size() + 2);
  for (size_t i = 0; i < acc.size(); ++i) {
    const Name acc_name{"acc", i};
    const Name grad_name{"grads", i};
    check_list_tensor(acc[i], acc_name, device);
    check_list_tensor(grads[i], grad_name, device);
    TORCH_CHECK_VALUE(grads[i].sizes() == acc[i].sizes(), grad_name, " has shape ",
                      shape_str(grads[i].sizes()), " but ", acc_name, " has ",
                      shape_str(acc[i].sizes()));
    check_no_grad(acc[i], acc_name);
    check_no_grad(grads[i], grad_name);
    add_span(spans, acc[i], acc_name, /*written=*/true);
    add_span(spans, grads[i], grad_name, /*written=*/false);
  }
  if (scale_tensor.has_value()) {
    check_state_tensor(scale_tensor, "scale", device);
    add_span(spans, *scale_tensor, Name{"scale", SIZE_MAX}, /*written=*/false);
  }
  for (const auto& [state, label] : {std::pair{&found_inf, "found_inf"}, std::pair{&norm_sq, "norm_sq"}}) {
    if (state->has_value()) {
      check_state_tensor(*state, label, device);
      check_no_grad(**state, Name{label, SIZE_MAX});
      add_span(spans, **state, Name{label, SIZE_MAX}, /*written=*/true);
    }
  }
  check_no_overlap(std::move(spans));
}

}  // namespace mbfused
