"""mbfused: fused, exact gradient accumulation over micro-batches for PyTorch.

Fused ops (in place, mixed dtypes, one pass):
    accumulate_(acc, grads, scale=1.0, *, overwrite=False, found_inf=None, norm_sq=None,
                stochastic_rounding=False, seed=None)
    finalize_(acc, inv_scale=1.0, *, max_norm=None, found_inf=None, norm_sq=None, out=None)
    wgrad_accumulate_(main_grad, grad_output, input, scale=1.0, *, overwrite=False)

Drop-in optimizer wrapper, a torch.optim.Optimizer (schedulers and GradScaler take it):
    MicroBatchOptimizer(optimizer, accumulation_steps, *, max_grad_norm=None, normalize="mean", ...)
    WindowMisuse: what a training loop that would train silently wrong gets instead

Autograd: nn.Linear (weight gradient accumulated in fp32 by wgrad_accumulate_),
convert_linears(model), scale_grad(x, scale) (identity; backward multiplies by scale).

Planner: plan_micro_batches(model, make_batch, global_batch, ...) -> the largest micro-batch
that fits and the accumulation steps that keep the global batch.

Backends: ``available_backends()``, ``use_backend(name)`` or ``MBFUSED_BACKEND``.
Importing mbfused never initialises CUDA and never fails because a backend is missing.
"""

import warnings

with warnings.catch_warnings():
    # torch warns "Failed to initialize NumPy" on import where numpy is not installed;
    # mbfused does not use numpy, so importing it says nothing about numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from mbfused import distributed, nn  # distributed registers the model= adapters (DDP, FSDP2)
from mbfused._backend import available_backends, use_backend
from mbfused._version import __version__
from mbfused.nn import convert_linears, scale_grad
from mbfused.ops import accumulate_, finalize_, wgrad_accumulate_
from mbfused.optim import MicroBatchOptimizer, WindowMisuse
from mbfused.planner import plan_micro_batches

__all__ = [
    "MicroBatchOptimizer",
    "WindowMisuse",
    "__version__",
    "accumulate_",
    "available_backends",
    "convert_linears",
    "distributed",
    "finalize_",
    "nn",
    "plan_micro_batches",
    "scale_grad",
    "use_backend",
    "wgrad_accumulate_",
]
