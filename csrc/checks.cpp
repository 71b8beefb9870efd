#include "checks.h"

#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <optional>
#include <ostream>
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
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

// Numbers reach messages as strings, never through a stream of ours: on a GPU image whose
// compiler (/opt/gcc) is newer than the libstdc++ the process loads, inserting an integer
// into a std::ostream from this library's code crashed the process (an H200 run: every
// message with a number segfaulted; those without one were raised as usual).
std::string num(int64_t value) { return std::to_string(value); }

std::string num(size_t value) { return std::to_string(value); }

std::string num(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.17g", value);
  return text;
}

std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i ? ", " : "") + num(sizes[i]);
  }
  return out + "]";
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
  return out << name.list << "[" << num(name.index) << "]";
}

bool supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// A tensor the op reads or writes: supported dtype, on `device`, dense. `reference`
// names the tensor that fixes the call's device in messages.
void check_operand(const at::Tensor& t, const Name& label, const at::Device& device, const char* reference) {
  TORCH_CHECK_VALUE(t.defined(), label, " is undefined");
  TORCH_CHECK_TYPE(supported_dtype(t.scalar_type()), label, " has dtype ", dtype_name(t.scalar_type()),
                   "; supported dtypes are torch.float32, torch.bfloat16 and torch.float16");
  TORCH_CHECK_VALUE(t.device() == device, label, " is on ", t.device(), " but ", reference, " is on ", device);
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, label, " must be a dense (strided) tensor");
}

void check_list_tensor(const at::Tensor& t, const Name& label, const at::Device& device,
                       const char* reference = "acc[0]") {
  check_operand(t, label, device, reference);
  TORCH_CHECK_VALUE(t.is_contiguous(), label, " is not contiguous (sizes ", shape_str(t.sizes()),
                    ", strides ", shape_str(t.strides()), "); pass a contiguous tensor");
}

void check_state_tensor(const std::optional<at::Tensor>& t, const char* label, const at::Device& device) {
  if (!t.has_value()) {
    return;
  }
  TORCH_CHECK_VALUE(t->layout() == at::kStrided, label, " must be a dense (strided) tensor");
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

// A tensor the op writes: torch forbids in-place updates of inference tensors outside
// inference mode, and so does every backend, before writing anything.
void check_writable(const at::Tensor& t, const Name& label) {
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), label,
                    " is an inference tensor, which cannot be updated in place outside "
                    "torch.inference_mode(); pass a tensor made outside inference mode");
}

// A byte range of a tensor's memory, tagged for the error message.
struct Span {
  uintptr_t begin;
  uintptr_t end;
  Name label;
  bool written;
};

// The bytes `t` can reach: from its first element to its last, strides included.
void add_span(std::vector<Span>& spans, const at::Tensor& t, Name label, bool written) {
  if (t.numel() == 0) {
    return;
  }
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  spans.push_back({begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size()), label, written});
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

// Checks element i of a list the op reads or writes against acc[0]'s device, and
// records its memory span.
void check_element(const at::Tensor& t, const Name& label, const at::Device& device, bool written,
                   std::vector<Span>& spans) {
  check_list_tensor(t, label, device);
  check_no_grad(t, label);
  if (written) {
    check_writable(t, label);
  }
  add_span(spans, t, label, written);
}

void check_same_shape(const at::Tensor& t, const Name& label, const at::Tensor& a, size_t i) {
  TORCH_CHECK_VALUE(t.sizes() == a.sizes(), label, " has shape ", shape_str(t.sizes()), " but ",
                    Name{"acc", i}, " has ", shape_str(a.sizes()));
}

// The 1-element fp32 tensors of a call (scale, inv_scale, found_inf, norm_sq).
void check_state(const std::optional<at::Tensor>& state, const char* label, const at::Device& device,
                 bool written, std::vector<Span>& spans) {
  if (state.has_value()) {
    check_state_tensor(state, label, device);
    check_no_grad(*state, Name{label, SIZE_MAX});
    if (written) {
      check_writable(*state, Name{label, SIZE_MAX});
    }
    add_span(spans, *state, Name{label, SIZE_MAX}, written);
  }
}

// The device of a list op's call: acc[0]'s or, with empty lists, that of the first
// 1-element tensor given (checked against it all the same); none without any tensor.
std::optional<at::Device> call_device(c10::ArrayRef<at::Tensor> acc,
                                      std::initializer_list<const std::optional<at::Tensor>*> states) {
  if (!acc.empty()) {
    return acc[0].device();
  }
  for (const std::optional<at::Tensor>* state : states) {
    if (state->has_value()) {
      return (*state)->device();
    }
  }
  return std::nullopt;
}

// The tensor seed of stochastic rounding: one int64 on the call's device.
// Read by the kernels, so it must not overlap what they write.
void check_seed(const std::optional<at::Tensor>& seed_tensor, const at::Device& device, std::vector<Span>& spans) {
  if (!seed_tensor.has_value()) {
    return;
  }
  const at::Tensor& seed = *seed_tensor;
  TORCH_CHECK_VALUE(seed.layout() == at::kStrided && seed.numel() == 1 && seed.scalar_type() == at::kLong &&
                        seed.device() == device,
                    "seed must be a 1-element torch.int64 tensor on ", device, ", got shape ",
                    shape_str(seed.sizes()), ", dtype ", dtype_name(seed.scalar_type()), " on ", seed.device());
  add_span(spans, seed, Name{"seed", SIZE_MAX}, /*written=*/false);
}

}  // namespace

void check_accumulate_args(
    c10::ArrayRef<at::Tensor> acc, c10::ArrayRef<at::Tensor> grads,
    const std::optional<at::Tensor>& scale_tensor, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& norm_sq, const std::optional<at::Tensor>& seed_tensor) {
  TORCH_CHECK_VALUE(acc.size() == grads.size(), "acc has ", num(acc.size()),
                    " tensors but grads has ", num(grads.size()));
  const std::optional<at::Device> call =
      call_device(acc, {&scale_tensor, &found_inf, &norm_sq, &seed_tensor});
  if (!call.has_value()) {
    return;
  }
  const at::Device device = *call;
  std::vector<Span> spans;
  spans.reserve(2 * acc.size() + 4);
  for (size_t i = 0; i < acc.size(); ++i) {
    check_element(acc[i], Name{"acc", i}, device, /*written=*/true, spans);
    check_element(grads[i], Name{"grads", i}, device, /*written=*/false, spans);
    check_same_shape(grads[i], Name{"grads", i}, acc[i], i);
  }
  check_state(scale_tensor, "scale", device, /*written=*/false, spans);
  check_state(found_inf, "found_inf", device, /*written=*/true, spans);
  check_state(norm_sq, "norm_sq", device, /*written=*/true, spans);
  check_seed(seed_tensor, device, spans);
  check_no_overlap(std::move(spans));
}

void check_finalize_args(
    c10::ArrayRef<at::Tensor> acc, const std::optional<at::Tensor>& inv_scale_tensor,
    std::optional<double> max_norm, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& norm_sq, c10::ArrayRef<at::Tensor> out,
    const std::optional<at::Tensor>& seed_tensor) {
  TORCH_CHECK_VALUE(!max_norm.has_value() || *max_norm > 0.0, "max_norm must be a positive number, got ",
                    num(*max_norm));
  TORCH_CHECK_VALUE(out.empty() || out.size() == acc.size(), "out has ", num(out.size()),
                    " tensors but acc has ", num(acc.size()));
  const std::optional<at::Device> call = call_device(acc, {&inv_scale_tensor, &found_inf, &norm_sq, &seed_tensor});
  if (!call.has_value()) {
    return;
  }
  const at::Device device = *call;
  const bool in_place = out.empty();
  std::vector<Span> spans;
  spans.reserve(2 * acc.size() + 4);
  for (size_t i = 0; i < acc.size(); ++i) {
    check_element(acc[i], Name{"acc", i}, device, /*written=*/in_place, spans);
    if (!in_place) {
      check_element(out[i], Name{"out", i}, device, /*written=*/true, spans);
      check_same_shape(out[i], Name{"out", i}, acc[i], i);
    }
  }
  check_state(inv_scale_tensor, "inv_scale", device, /*written=*/false, spans);
  check_state(found_inf, "found_inf", device, /*written=*/false, spans);
  check_state(norm_sq, "norm_sq", device, /*written=*/false, spans);
  check_seed(seed_tensor, device, spans);
  check_no_overlap(std::move(spans));
}

void check_wgrad_args(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input,
                      const std::optional<at::Tensor>& scale_tensor) {
  const Name main_name{"main_grad", SIZE_MAX};
  TORCH_CHECK_VALUE(main_grad.defined(), "main_grad is undefined");
  TORCH_CHECK_TYPE(main_grad.scalar_type() == at::kFloat, "main_grad has dtype ",
                   dtype_name(main_grad.scalar_type()),
                   "; wgrad_accumulate_ accumulates into torch.float32 buffers");
  TORCH_CHECK_VALUE(main_grad.dim() == 2, "main_grad must be 2-D [out, in], got shape ",
                    shape_str(main_grad.sizes()));
  const at::Device device = main_grad.device();
  check_list_tensor(main_grad, main_name, device, "main_grad");
  check_no_grad(main_grad, main_name);
  check_writable(main_grad, main_name);
  for (const auto& [t, label] : {std::pair<const at::Tensor&, const char*>{grad_output, "grad_output"},
                                 std::pair<const at::Tensor&, const char*>{input, "input"}}) {
    check_operand(t, Name{label, SIZE_MAX}, device, "main_grad");  // any strides
    TORCH_CHECK_VALUE(t.dim() > 0, label, " must have at least 1 dimension, got a 0-d tensor");
    check_no_grad(t, Name{label, SIZE_MAX});
  }
  TORCH_CHECK_VALUE(grad_output.size(-1) == main_grad.size(0), "grad_output has shape ",
                    shape_str(grad_output.sizes()), ": its last dimension must be main_grad.shape[0] = ",
                    num(main_grad.size(0)));
  TORCH_CHECK_VALUE(input.size(-1) == main_grad.size(1), "input has shape ", shape_str(input.sizes()),
                    ": its last dimension must be main_grad.shape[1] = ", num(main_grad.size(1)));
  TORCH_CHECK_VALUE(grad_output.sizes().slice(0, grad_output.dim() - 1) == input.sizes().slice(0, input.dim() - 1),
                    "grad_output has shape ", shape_str(grad_output.sizes()), " but input has ",
                    shape_str(input.sizes()), ": their leading (token) dimensions must match");
  std::vector<Span> spans;
  check_state(scale_tensor, "scale", device, /*written=*/false, spans);
  add_span(spans, main_grad, main_name, /*written=*/true);
  add_span(spans, grad_output, Name{"grad_output", SIZE_MAX}, /*written=*/false);
  add_span(spans, input, Name{"input", SIZE_MAX}, /*written=*/false);
  check_no_overlap(std::move(spans));
}

}  // namespace mbfused
