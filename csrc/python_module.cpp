// The Python module mbfused._C. Importing it loads this library, which registers the
// ops of ops.cpp, cpu/ and cuda/. Its functions are the eager entry points of the list
// ops, which mbfused/ops.py calls before falling back to the dispatcher.
//
// Why they exist: a call through torch.ops converts each tensor list into IValues, and
// the kernel's boxed wrapper copies them into a std::vector<at::Tensor> with the GIL
// released. Dropping each copy then takes the GIL back to release the tensor's Python
// object, so a list of a thousand small tensors costs a thousand GIL round trips, most
// of the call. Here the lists' tensors are taken and dropped with the GIL held, the GIL
// is released only while the kernel runs, and the compiled op is called below the
// autograd keys, where it is the backend kernel itself, unboxed: no IValues, no
// further copies. The call is recorded under the public op's name for the profiler.
//
// They handle plain CPU and CUDA tensors with no mode active. Anything else (tensor
// subclasses, meta or fake tensors, TorchDispatchModes, torch function modes, functorch
// transforms, a kernel registered for the public op) is answered with "not taken", and
// ops.py goes through the dispatcher.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <Python.h>

#include <optional>
#include <vector>

namespace mbfused {
namespace {

// Dispatch keys a plain dense CPU or CUDA tensor may carry.
const c10::DispatchKeySet kPlainTensorKeys{
    c10::DispatchKey::CPU,         c10::DispatchKey::CUDA,        c10::DispatchKey::ADInplaceOrView,
    c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutogradCUDA, c10::DispatchKey::AutocastCPU,
    c10::DispatchKey::AutocastCUDA};

// Keys the thread-local include set holds when no mode or transform is active.
const c10::DispatchKeySet kPlainIncludedKeys{c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView};

bool no_mode_active() {
  return !at::impl::torch_function_mode_enabled() && c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         kPlainIncludedKeys.isSupersetOf(c10::impl::tls_local_dispatch_key_set().included_);
}

// True when a kernel was registered for the public op on CPU or CUDA (e.g. with
// torch.library.register_kernel): the dispatcher must run it then.
bool has_device_override(const c10::OperatorHandle& public_op) {
  return public_op.hasKernelForDispatchKey(c10::DispatchKey::CPU) ||
         public_op.hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

// The tensor behind `obj` when it is a plain tensor (torch.Tensor or nn.Parameter)
// the kernels can take directly; nullptr otherwise.
const at::Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) {
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  return kPlainTensorKeys.isSupersetOf(t.key_set()) ? &t : nullptr;
}

// The tensors of a Python list or tuple of plain tensors, read with the GIL held and
// no Python code run meanwhile. They are real references, which other code relies on
// (torch.utils.swap_tensors refuses to swap a tensor in use); they are taken and
// dropped with the GIL held, so the Python object behind each tensor is updated without
// the GIL round trip that makes the dispatcher's copies costly.
class ListTensors {
 public:
  explicit ListTensors(PyObject* sequence) {
    const bool is_list = PyList_CheckExact(sequence);
    if (!is_list && !PyTuple_CheckExact(sequence)) {
      return;  // subclasses may run Python code on access: the dispatcher handles them
    }
    const Py_ssize_t n = is_list ? PyList_GET_SIZE(sequence) : PyTuple_GET_SIZE(sequence);
    tensors_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor* t = plain_tensor(is_list ? PyList_GET_ITEM(sequence, i) : PyTuple_GET_ITEM(sequence, i));
      if (t == nullptr) {
        return;
      }
      tensors_.push_back(*t);
    }
    plain_ = true;
  }

  // True when the sequence was a list or tuple of plain tensors.
  bool plain() const { return plain_; }
  at::TensorList tensors() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
  bool plain_ = false;
};

PyObject* empty_tuple() {
  static PyObject* const empty = PyTuple_New(0);
  return empty;
}

// An optional tensor argument: `*ok` turns false when it is neither None nor plain.
std::optional<at::Tensor> optional_plain_tensor(PyObject* obj, bool* ok) {
  if (obj == Py_None) {
    return std::nullopt;
  }
  const at::Tensor* t = plain_tensor(obj);
  *ok = *ok && t != nullptr;
  return t ? std::optional<at::Tensor>(*t) : std::nullopt;
}

// The optional tensors of a list op: a tensor scale, found_inf and norm_sq.
struct StateTensors {
  std::optional<at::Tensor> scale;
  std::optional<at::Tensor> found_inf;
  std::optional<at::Tensor> norm_sq;
  bool plain = true;  // each is None or a plain tensor

  StateTensors(PyObject* scale_obj, PyObject* found_inf_obj, PyObject* norm_sq_obj) {
    scale = optional_plain_tensor(scale_obj, &plain);
    found_inf = optional_plain_tensor(found_inf_obj, &plain);
    norm_sq = optional_plain_tensor(norm_sq_obj, &plain);
  }
};

// Releases the GIL for its lifetime; takes it back even when the kernel throws.
class GilReleased {
 public:
  GilReleased() : state_(PyEval_SaveThread()) {}
  ~GilReleased() { PyEval_RestoreThread(state_); }
  GilReleased(const GilReleased&) = delete;
  GilReleased& operator=(const GilReleased&) = delete;

 private:
  PyThreadState* state_;
};

// Runs a compiled op with the GIL released, below the autograd keys: there the
// dispatcher calls the CPU or CUDA kernel directly (the kernels check requires_grad).
template <typename Call>
auto run_kernel(const Call& call) {
  GilReleased gil_released;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call();
}

// What torch.autograd.graph.increment_version does: the kernels write through raw
// pointers, which autograd cannot see. Inference tensors have no version counter.
void mark_written(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (!t.is_inference()) {
      torch::autograd::impl::bump_version(t);
    }
  }
}

void mark_written(const std::optional<at::Tensor>& t) {
  if (t.has_value()) {
    mark_written(at::TensorList(*t));
  }
}

// The .grad of each parameter of a Python list, when every parameter is a plain tensor
// (torch.Tensor or nn.Parameter: a subclass's .grad may be a property) with a plain,
// contiguous gradient; not plain when any has no gradient, a non-contiguous one (the
// caller's long way copies those), or one whose Python object is a tensor subclass (its
// __torch_function__ must see the public op).
class ParamGrads {
 public:
  explicit ParamGrads(PyObject* params) {
    if (!PyList_CheckExact(params)) {
      return;
    }
    const Py_ssize_t n = PyList_GET_SIZE(params);
    grads_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* param = PyList_GET_ITEM(params, i);
      if (!THPVariable_CheckExact(param)) {
        return;
      }
      const at::Tensor& grad = THPVariable_Unpack(param).grad();
      if (!grad.defined() || !kPlainTensorKeys.isSupersetOf(grad.key_set()) || !grad.is_contiguous()) {
        return;
      }
      // Its Python object (made here if it has none yet, as reading p.grad would).
      PyObject* grad_obj = THPVariable_Wrap(grad);
      const bool exact = grad_obj != nullptr && THPVariable_CheckExact(grad_obj);
      Py_XDECREF(grad_obj);
      if (!exact) {
        PyErr_Clear();
        return;
      }
      grads_.push_back(grad);
    }
    plain_ = true;
  }

  bool plain() const { return plain_; }
  at::TensorList tensors() const { return grads_; }

  // Sets .grad to None on each parameter whose gradient is still the one read here (a
  // gradient another thread set meanwhile was not accumulated, and stays).
  void clear(PyObject* params) const {
    for (size_t i = 0; i < grads_.size(); ++i) {
      at::Tensor& grad = THPVariable_Unpack(PyList_GET_ITEM(params, static_cast<Py_ssize_t>(i))).mutable_grad();
      if (grad.unsafeGetTensorImpl() == grads_[i].unsafeGetTensorImpl()) {
        grad = at::Tensor();
      }
    }
  }

 private:
  std::vector<at::Tensor> grads_;
  bool plain_ = false;
};

// The arguments of accumulate_ after its two lists, as the eager entries take them:
// (scale: float, scale_tensor, overwrite: bool, found_inf, norm_sq[, stochastic_rounding: bool,
// seed: int, seed_tensor]).
struct AccumulateArgs {
  PyObject *scale_tensor, *overwrite, *found_inf, *norm_sq;
  PyObject* stochastic = Py_False;
  PyObject* seed_tensor = Py_None;
  double scale = 1.0;
  long long seed = 0;
};

// Parses (first, second, <AccumulateArgs>): the two eager accumulate entries differ only
// in what their second list holds (gradients, or parameters whose .grad are read).
bool parse_accumulate_call(PyObject* py_args, PyObject** first, PyObject** second, AccumulateArgs* args) {
  return PyArg_ParseTuple(py_args, "OOdOOOO|OLO", first, second, &args->scale, &args->scale_tensor,
                          &args->overwrite, &args->found_inf, &args->norm_sq, &args->stochastic, &args->seed,
                          &args->seed_tensor) != 0;
}

// Runs accumulate_'s compiled kernel on `acc` and `grads`; false (nothing run) when the
// call is not the eager entry's to take: a mode is active, a kernel was registered for
// the public op, or an argument is not a plain tensor (or a bool where one is due).
// Raises as the op does, before anything is written.
bool accumulate_plain(const ListTensors& acc, bool grads_plain, at::TensorList grads, const AccumulateArgs& args) {
  static const c10::OperatorHandle public_op = c10::Dispatcher::singleton().findSchemaOrThrow("mbfused::accumulate_", "");
  // A non-bool overwrite is the dispatcher's to reject, as the schema says bool.
  if (!no_mode_active() || !PyBool_Check(args.overwrite) || !PyBool_Check(args.stochastic) ||
      has_device_override(public_op)) {
    return false;
  }
  const StateTensors state(args.scale_tensor, args.found_inf, args.norm_sq);
  bool seed_plain = true;
  const std::optional<at::Tensor> seed_tensor = optional_plain_tensor(args.seed_tensor, &seed_plain);
  if (!acc.plain() || !grads_plain || !state.plain || !seed_plain || acc.tensors().empty()) {
    return false;
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mbfused::_accumulate_native_", "")
                             .typed<void(at::TensorList, at::TensorList, double, const std::optional<at::Tensor>&,
                                         bool, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, bool, int64_t,
                                         const std::optional<at::Tensor>&)>();
  RECORD_FUNCTION("mbfused::accumulate_", std::vector<c10::IValue>());
  run_kernel([&] {
    op.call(acc.tensors(), grads, args.scale, state.scale, args.overwrite == Py_True, state.found_inf,
            state.norm_sq, args.stochastic == Py_True, static_cast<int64_t>(args.seed), seed_tensor);
  });
  mark_written(acc.tensors());
  mark_written(state.found_inf);
  mark_written(state.norm_sq);
  return true;
}

// _accumulate_eager(acc: list | tuple, grads: list | tuple, <AccumulateArgs>)
//                   -> bool: True when it ran the op, False when not taken.
PyObject* accumulate_eager(PyObject* /*module*/, PyObject* py_args) {
  HANDLE_TH_ERRORS
  PyObject *acc_obj, *grads_obj;
  AccumulateArgs args;
  if (!parse_accumulate_call(py_args, &acc_obj, &grads_obj, &args)) {
    return nullptr;
  }
  const ListTensors acc(acc_obj);
  const ListTensors grads(grads_obj);
  // The list tensors are dropped on return, with the GIL held.
  return PyBool_FromLong(accumulate_plain(acc, grads.plain(), grads.tensors(), args));
  END_HANDLE_TH_ERRORS
}

// _accumulate_grads_of_eager(acc: list | tuple, params: list, <AccumulateArgs>) -> bool:
// accumulate_(acc, [p.grad for p in params], ...), then p.grad = None for each, when it
// ran the op: True. False, with nothing changed, when not taken (as _accumulate_eager
// says, or a parameter has no gradient). Raises as the op does, with nothing changed.
// A window's micro-batch in one pass over the parameters, where reading the gradients
// into a Python list and clearing them would take two.
PyObject* accumulate_grads_of_eager(PyObject* /*module*/, PyObject* py_args) {
  HANDLE_TH_ERRORS
  PyObject *acc_obj, *params_obj;
  AccumulateArgs args;
  if (!parse_accumulate_call(py_args, &acc_obj, &params_obj, &args)) {
    return nullptr;
  }
  const ListTensors acc(acc_obj);
  const ParamGrads grads(params_obj);
  if (!accumulate_plain(acc, grads.plain(), grads.tensors(), args)) {
    Py_RETURN_FALSE;
  }
  grads.clear(params_obj);
  // The gradients are dropped on return, with the GIL held (the last reference frees them).
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// _finalize_eager(acc: list | tuple, inv_scale: float, inv_scale_tensor, max_norm: float | None,
//                 found_inf, norm_sq, out: list | tuple | None[, stochastic_rounding: bool, seed: int,
//                 seed_tensor]) -> Tensor | None (None: not taken).
PyObject* finalize_eager(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *acc_obj, *inv_scale_tensor_obj, *max_norm_obj, *found_inf_obj, *norm_sq_obj, *out_obj;
  PyObject* stochastic_obj = Py_False;
  PyObject* seed_tensor_obj = Py_None;
  double inv_scale;
  long long seed = 0;
  if (!PyArg_ParseTuple(args, "OdOOOOO|OLO", &acc_obj, &inv_scale, &inv_scale_tensor_obj, &max_norm_obj,
                        &found_inf_obj, &norm_sq_obj, &out_obj, &stochastic_obj, &seed, &seed_tensor_obj)) {
    return nullptr;
  }
  static const c10::OperatorHandle public_op = c10::Dispatcher::singleton().findSchemaOrThrow("mbfused::finalize_", "");
  if (!no_mode_active() || !(max_norm_obj == Py_None || PyFloat_CheckExact(max_norm_obj)) ||
      !PyBool_Check(stochastic_obj) || has_device_override(public_op)) {
    Py_RETURN_NONE;
  }
  const ListTensors acc(acc_obj);
  const ListTensors out(out_obj == Py_None ? empty_tuple() : out_obj);
  const StateTensors state(inv_scale_tensor_obj, found_inf_obj, norm_sq_obj);
  bool seed_plain = true;
  const std::optional<at::Tensor> seed_tensor = optional_plain_tensor(seed_tensor_obj, &seed_plain);
  // The compiled op takes an empty out for "in place": an out of another length than
  // acc, empty included, is the dispatcher's to refuse.
  const bool out_fits = out_obj == Py_None || out.tensors().size() == acc.tensors().size();
  if (!acc.plain() || !out.plain() || !state.plain || !seed_plain || acc.tensors().empty() || !out_fits) {
    Py_RETURN_NONE;
  }
  const std::optional<double> max_norm =
      max_norm_obj == Py_None ? std::nullopt : std::optional<double>(PyFloat_AS_DOUBLE(max_norm_obj));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mbfused::_finalize_native_", "")
                             .typed<at::Tensor(at::TensorList, double, const std::optional<at::Tensor>&,
                                               std::optional<double>, const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, at::TensorList, bool, int64_t,
                                               const std::optional<at::Tensor>&)>();
  RECORD_FUNCTION("mbfused::finalize_", std::vector<c10::IValue>());
  at::Tensor total_norm = run_kernel([&] {
    return op.call(acc.tensors(), inv_scale, state.scale, max_norm, state.found_inf, state.norm_sq,
                   out.tensors(), stochastic_obj == Py_True, static_cast<int64_t>(seed), seed_tensor);
  });
  mark_written(out.tensors().empty() ? acc.tensors() : out.tensors());
  return THPVariable_Wrap(std::move(total_norm));
  END_HANDLE_TH_ERRORS
}

// The .grad of each parameter of a list (None where it has none), or None when the list
// holds anything but plain tensors and parameters (whose .grad may be a property of a
// subclass). The window reads every managed parameter's gradient once per micro-batch:
// through Python that is a few hundred nanoseconds per parameter, here a few.
PyObject* grads_of(PyObject* /*self*/, PyObject* params) {
  HANDLE_TH_ERRORS
  if (!PyList_CheckExact(params)) {
    Py_RETURN_NONE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(PyList_GET_ITEM(params, i))) {
      Py_RETURN_NONE;
    }
  }
  PyObject* grads = PyList_New(n);
  if (grads == nullptr) {
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& grad = THPVariable_Unpack(PyList_GET_ITEM(params, i)).grad();
    PyObject* item = grad.defined() ? THPVariable_Wrap(grad) : Py_NewRef(Py_None);
    if (item == nullptr) {
      Py_DECREF(grads);
      return nullptr;
    }
    PyList_SET_ITEM(grads, i, item);
  }
  return grads;
  END_HANDLE_TH_ERRORS
}

// `grads_of` and `clear_grads` in one call: the .grad of each parameter of a list (None
// where it has none), each then set to None; None (and nothing changed) when the list holds
// anything but plain tensors and parameters. The window takes a micro-batch's gradients
// off the parameters this way before accumulating them (and puts them back if that
// fails): a clear after the kernel would walk a thousand parameters again once the
// kernel has streamed the gradients through the cache, missing it on every one.
PyObject* take_grads(PyObject* self, PyObject* params) {
  HANDLE_TH_ERRORS
  PyObject* grads = grads_of(self, params);
  if (grads == nullptr || grads == Py_None) {
    return grads;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  for (Py_ssize_t i = 0; i < n; ++i) {
    THPVariable_Unpack(PyList_GET_ITEM(params, i)).mutable_grad() = at::Tensor();
  }
  return grads;
  END_HANDLE_TH_ERRORS
}

// setattr(obj, name, value) for each object of a list, as a Python loop would do it (any
// __setattr__ runs; the first error stops it). The window flips `overwrite_main_grad` on
// every parameter twice per window; the interpreter's loop costs as much as the setattr.
PyObject* set_attribute(PyObject* /*self*/, PyObject* args) {
  PyObject* objects = nullptr;
  PyObject* name = nullptr;
  PyObject* value = nullptr;
  if (!PyArg_ParseTuple(args, "O!UO", &PyList_Type, &objects, &name, &value)) {
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(objects); ++i) {
    PyObject* object = Py_NewRef(PyList_GET_ITEM(objects, i));  // a __setattr__ may change the list
    const int failed = PyObject_SetAttr(object, name, value);
    Py_DECREF(object);
    if (failed != 0) {
      return nullptr;
    }
  }
  Py_RETURN_NONE;
}

// Sets .grad to None on each parameter of a list, as `p.grad = None` does; False (and
// nothing changed) when the list holds anything but plain tensors and parameters.
PyObject* clear_grads(PyObject* /*self*/, PyObject* params) {
  HANDLE_TH_ERRORS
  if (!PyList_CheckExact(params)) {
    Py_RETURN_FALSE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(PyList_GET_ITEM(params, i))) {
      Py_RETURN_FALSE;
    }
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    THPVariable_Unpack(PyList_GET_ITEM(params, i)).mutable_grad() = at::Tensor();
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// Sets each parameter's .grad to the tensor at the same position, as `p.grad = g` does for
// a gradient of the parameter's shape, dtype and device; False (and nothing changed) when
// any pair is not of plain tensors or does not match. The window hands its gradient to the
// optimizer this way at its end.
PyObject* set_grads(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* params = nullptr;
  PyObject* grads = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &params, &grads) || !PyList_CheckExact(params) ||
      !PyList_CheckExact(grads) || PyList_GET_SIZE(params) != PyList_GET_SIZE(grads)) {
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* param = PyList_GET_ITEM(params, i);
    PyObject* grad = PyList_GET_ITEM(grads, i);
    if (!THPVariable_CheckExact(param) || !THPVariable_CheckExact(grad)) {
      Py_RETURN_FALSE;
    }
    const at::Tensor& p = THPVariable_Unpack(param);
    const at::Tensor& g = THPVariable_Unpack(grad);
    if (g.sizes() != p.sizes() || g.scalar_type() != p.scalar_type() || g.device() != p.device() ||
        g.layout() != p.layout() || g.requires_grad()) {
      Py_RETURN_FALSE;
    }
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    THPVariable_Unpack(PyList_GET_ITEM(params, i)).mutable_grad() = THPVariable_Unpack(PyList_GET_ITEM(grads, i));
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_accumulate_eager", accumulate_eager, METH_VARARGS,
     "accumulate_ on plain CPU/CUDA tensors without the dispatcher's list copies; False when not taken."},
    {"_accumulate_grads_of_eager", accumulate_grads_of_eager, METH_VARARGS,
     "_accumulate_eager on the .grad of a list of parameters, each then set to None; False when not taken."},
    {"_finalize_eager", finalize_eager, METH_VARARGS,
     "finalize_ on plain CPU/CUDA tensors without the dispatcher's list copies; None when not taken."},
    {"_grads_of", grads_of, METH_O, "[p.grad for p in params] for a list of plain tensors; None when not taken."},
    {"_set_grads", set_grads, METH_VARARGS,
     "p.grad = g for matching lists of plain tensors; False when not taken."},
    {"_take_grads", take_grads, METH_O,
     "[p.grad for p in params], each then set to None, for a list of plain tensors; None when not taken."},
    {"_set_attribute", set_attribute, METH_VARARGS, "setattr(obj, name, value) for each object of a list."},
    {"_clear_grads", clear_grads, METH_O,
     "p.grad = None for each of a list of plain tensors; False when not taken."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace mbfused

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, mbfused::methods};
  return PyModule_Create(&module);
}
