"""Compiles every Triton kernel of mbfused for a CUDA GPU, on a machine without one.

Run as a script (tests/test_triton_gpu_compile.py does, in a process of its own): the
interpreter (TRITON_INTERPRET=1) that runs the Triton tests on CPU tensors never
compiles a kernel, so code the interpreter accepts could still fail to compile, or
compile without vector accesses, on a GPU. Here the entry points of ``mbfused.kernels``
run on CPU tensors as they would on CUDA ones (same launch plans, groups, constexprs,
options and alignment specialisation), with two changes to Triton's runtime: its
active driver reports a CUDA target (``--arch``, sm_90 by default) and a launch compiles
without running (Triton's ``warmup``), for each autotuning config in turn instead of
timing them. Nothing is dereferenced: no kernel runs.

Prints a JSON object: the kernels defined, and per compiled variant the kernel, its
constexprs, its launch options and, from the PTX, the counts of global loads and stores,
of the vector ones among them and of the 128-bit (``.v4``) ones.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter compiles nothing")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


class CompileOnlyCudaDriver:
    """What Triton's runtime asks of the active driver before a compile, for a CUDA
    target without a CUDA device."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


# A global load or store, after its predicate if it has one, and its qualifiers:
# "@%p2 ld.global.v4.b32 {...}", "ld.global.L1::evict_last.v2.b32 {...}".
GLOBAL_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)")


def ptx_global_accesses(ptx: str) -> dict:
    """Counts of global loads and stores; "vector_*" those of 2 or 4 words (which need
    an address aligned to their size), "v4_*" those of 4 (128 bits)."""
    counts = {f"{width}{kind}": 0 for width in ("", "vector_", "v4_") for kind in ("loads", "stores")}
    for line in ptx.splitlines():
        access = GLOBAL_ACCESS.match(line)
        if access:
            kind = "loads" if access.group(1) == "ld" else "stores"
            qualifiers = access.group(2).split(".")
            counts[kind] += 1
            if "v2" in qualifiers or "v4" in qualifiers:
                counts["vector_" + kind] += 1
            if "v4" in qualifiers:
                counts["v4_" + kind] += 1
    return counts


def describe(value):
    if isinstance(value, triton.language.dtype):
        return str(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def install_compile_only_runtime(arch: int, compiled: list) -> None:
    driver.set_active(CompileOnlyCudaDriver(arch))
    run = JITFunction.run
    seen = set()

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if id(kernel) not in seen:  # a variant compiled by this call, not one from the cache
            seen.add(id(kernel))
            names = [p.name for p in self.params]
            # None arguments are constexprs too (Triton specialises on them).
            constexprs = {p.name: describe(value) for p, value in zip(self.params, args)
                          if p.is_constexpr or value is None}
            constexprs.update({k: describe(v) for k, v in kwargs.items() if k in names})
            options = {k: describe(v) for k, v in kwargs.items() if k not in names and k not in (
                "debug", "instrumentation_mode")}
            compiled.append({"kernel": self.fn.__name__, "constexprs": constexprs, "options": options,
                             **ptx_global_accesses(kernel.asm["ptx"])})
        return kernel

    def every_config(self, *args, **kwargs):
        # Each config compiled, none timed; the autotuner's cache and scratch runs untouched.
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run = compile_only
    Autotuner.run = every_config


def defined_kernels() -> list[str]:
    """The names of the kernels the entry points launch (``*_kernel`` by convention; the
    other jitted functions are inlined into them)."""
    from mbfused.kernels import accumulate, finalize, wgrad

    return sorted(name for module in (accumulate, finalize, wgrad) for name, value in vars(module).items()
                  if name.endswith("_kernel") and isinstance(value, (JITFunction, Autotuner)))


def launch_every_variant() -> None:
    """The calls whose launches cover every kernel and every specialisation the entry
    points make: each dtype pair, aligned or not, each flag, scalar or tensor scale and seed."""
    from mbfused.kernels import accumulate as accumulate_kernels
    from mbfused.kernels import finalize as finalize_kernels
    from mbfused.kernels import wgrad as wgrad_kernels

    def tensors(dtype, aligned=True, n=1000):
        offset = 0 if aligned else 1
        return torch.zeros(n + offset, dtype=dtype)[offset:]

    fp32, bf16, fp16 = torch.float32, torch.bfloat16, torch.float16
    flag = torch.zeros(1)
    seed_tensor = torch.tensor([7], dtype=torch.int64)
    for aligned in (True, False):
        for acc_dtype, grad_dtype in ((fp32, bf16), (fp32, fp16), (fp32, fp32), (bf16, bf16),
                                      (fp16, fp16), (bf16, fp32)):
            accumulate_kernels.accumulate_(
                [tensors(acc_dtype, aligned)], [tensors(grad_dtype, aligned)], 0.5)
            accumulate_kernels.accumulate_(
                [tensors(acc_dtype, aligned)], [tensors(grad_dtype, aligned)], torch.ones(1),
                overwrite=True, found_inf=flag, norm_sq=torch.zeros(1))
        for seed in (11, seed_tensor):
            accumulate_kernels.accumulate_(
                [tensors(bf16, aligned)], [tensors(bf16, aligned)], 0.25, found_inf=flag,
                stochastic_rounding=True, seed=seed)
            accumulate_kernels.accumulate_(
                [tensors(fp16, aligned)], [tensors(fp32, aligned)], 0.25, norm_sq=torch.zeros(1),
                stochastic_rounding=True, seed=seed)

        for acc_dtype in (fp32, bf16, fp16):
            # Without norm_sq the squares are summed first (sum_squares_kernel).
            finalize_kernels.finalize_([tensors(acc_dtype, aligned)], 0.5, max_norm=1.0, found_inf=flag)
            finalize_kernels.finalize_([tensors(acc_dtype, aligned)], torch.ones(1), norm_sq=torch.ones(1))
            finalize_kernels.finalize_([tensors(acc_dtype, aligned)], 0.5, stochastic_rounding=True, seed=3)
        for out_dtype in (bf16, fp16, fp32):
            finalize_kernels.finalize_([tensors(fp32, aligned)], 0.5, max_norm=1.0,
                                       out=[tensors(out_dtype, aligned)])
            finalize_kernels.finalize_([tensors(fp32, aligned)], 0.5, out=[tensors(out_dtype, aligned)],
                                       stochastic_rounding=True, seed=seed_tensor)

    for go_dtype, x_dtype in ((bf16, bf16), (fp16, fp16), (fp32, fp32), (bf16, fp32)):
        for scale, overwrite in ((0.5, False), (torch.ones(1), True)):
            wgrad_kernels.wgrad_accumulate_(
                torch.zeros(96, 80), torch.zeros(4, 24, 96, dtype=go_dtype),
                torch.zeros(4, 24, 80, dtype=x_dtype), scale, overwrite=overwrite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (sm_90)")
    args = parser.parse_args()
    compiled: list = []
    install_compile_only_runtime(args.arch, compiled)
    launch_every_variant()
    json.dump({"triton": triton.__version__, "arch": args.arch, "kernels": defined_kernels(),
               "variants": compiled}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
