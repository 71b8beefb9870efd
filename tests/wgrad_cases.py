"""wgrad_accumulate_ tests shared by every backend.

A test module imports these functions and defines a ``target`` fixture giving
(backend, device): test_wgrad.py for the cpu and torch backends (and every backend on a
GPU), test_triton_wgrad.py for the triton backend under the interpreter.

A GEMM's summation order is its own, so results are compared with the exact product
(fp64) within a rigorous bound on fp32 summation error, not bit for bit: for a sum of T
products, |error| <= (T + 2) * 2^-24 * sum |terms| (plus one rounding each for the scale
and the add).
"""

from __future__ import annotations

import pytest
import torch
from accumulate_cases import assert_rejected_unchanged

import mbfused
from mbfused import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPERAND_PAIRS = [(g, x) for g in DTYPES for x in DTYPES]
FP32_EPS = 2.0 ** -24

__all__ = [
    "test_accumulates_within_the_fp32_error_bound",
    "test_bad_input_raises_and_changes_nothing",
    "test_matches_the_torch_reference",
    "test_more_exact_than_a_16_bit_weight_gradient",
    "test_negative_zero_scale_keeps_its_sign",
    "test_no_tokens_and_empty_buffers",
    "test_no_tokens_give_a_zero_product_times_the_scale",
    "test_opcheck",
    "test_overwrite_discards_nan_in_main_grad",
    "test_scale_as_tensor_equals_scale_as_float",
    "test_special_scales_follow_the_reference",
    "test_strided_operands_equal_contiguous_ones",
    "test_torch_compile_fullgraph",
]


def make_inputs(out_features, in_features, tokens, go_dtype, x_dtype, device, seed=0):
    """main_grad [out, in] fp32, grad_output [*tokens, out], input [*tokens, in]."""
    gen = torch.Generator().manual_seed(seed)
    main_grad = torch.randn(out_features, in_features, generator=gen).to(device)
    go = torch.randn(*tokens, out_features, generator=gen).to(device=device, dtype=go_dtype)
    x = torch.randn(*tokens, in_features, generator=gen).to(device=device, dtype=x_dtype)
    return main_grad, go, x


def run(target, main_grad, go, x, scale=1.0, **kwargs):
    """The op on a copy of main_grad, on the target backend; returns the copy."""
    backend, _ = target
    result = main_grad.clone()
    with mbfused.use_backend(backend):
        mbfused.wgrad_accumulate_(result, go, x, scale, **kwargs)
    return result


def exact_and_bound(main_grad, go, x, scale, overwrite=False):
    """The exact result (fp64) and the largest error an fp32 GEMM may make on it."""
    out_features, in_features = main_grad.shape
    tokens = go.shape[:-1].numel()  # not -1: ambiguous when a feature count is 0
    a = go.reshape(tokens, out_features).double().cpu()
    b = x.reshape(tokens, in_features).double().cpu()
    s = float(scale)
    base = torch.zeros_like(main_grad, dtype=torch.float64, device="cpu") if overwrite \
        else main_grad.double().cpu()
    exact = base + s * (a.t() @ b)
    magnitude = abs(s) * (a.abs().t() @ b.abs())
    bound = (tokens + 4) * FP32_EPS * magnitude + 2 * FP32_EPS * base.abs() + 1e-30
    return exact, bound


def assert_within(result, exact, bound, what="main_grad"):
    error = (result.double().cpu() - exact).abs()
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the fp32 bound"


@pytest.mark.parametrize("go_dtype,x_dtype", OPERAND_PAIRS, ids=str)
@pytest.mark.parametrize("shape,tokens", [
    ((1, 1), (1,)), ((5, 3), (37,)), ((70, 90), (3, 50)), ((130, 65), (300,)), ((16, 16), (64,)),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_accumulates_within_the_fp32_error_bound(target, go_dtype, x_dtype, shape, tokens, overwrite):
    main_grad, go, x = make_inputs(*shape, tokens, go_dtype, x_dtype, target[1], seed=sum(shape))
    result = run(target, main_grad, go, x, 0.375, overwrite=overwrite)
    assert result.dtype == torch.float32 and result.shape == main_grad.shape
    assert_within(result, *exact_and_bound(main_grad, go, x, 0.375, overwrite))


@pytest.mark.parametrize("go_dtype,x_dtype", [(torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float32)], ids=str)
def test_matches_the_torch_reference(target, go_dtype, x_dtype):
    main_grad, go, x = make_inputs(40, 24, (2, 33), go_dtype, x_dtype, target[1], seed=3)
    ours = run(target, main_grad, go, x, 0.5)
    theirs = main_grad.clone()
    reference.wgrad_accumulate_(theirs, go, x, 0.5)
    _, bound = exact_and_bound(main_grad, go, x, 0.5)
    assert_within(ours, theirs.double().cpu(), 2 * bound)


def test_more_exact_than_a_16_bit_weight_gradient(target):
    # The point of the op: a bf16 weight gradient (what autograd materialises for bf16
    # layers) keeps 8 bits; accumulated in fp32 it keeps 24.
    main_grad, go, x = make_inputs(64, 48, (256,), torch.bfloat16, torch.bfloat16, target[1], seed=4)
    main_grad.zero_()
    exact, _ = exact_and_bound(main_grad, go, x, 1.0)
    ours = run(target, main_grad, go, x)
    lossy = main_grad.clone()
    reference.baseline_wgrad_add_(lossy, go, x)
    ours_error = (ours.double().cpu() - exact).abs().max().item()
    lossy_error = (lossy.double().cpu() - exact).abs().max().item()
    assert ours_error * 1000 < lossy_error


def test_overwrite_discards_nan_in_main_grad(target):
    main_grad, go, x = make_inputs(33, 17, (20,), torch.bfloat16, torch.float16, target[1])
    main_grad[3, 4] = float("nan")
    main_grad[0, 0] = float("inf")
    result = run(target, main_grad, go, x, 2.0, overwrite=True)
    assert torch.isfinite(result).all()
    assert_within(result, *exact_and_bound(main_grad, go, x, 2.0, overwrite=True))


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("scale_shape", [(1,), (), (1, 1, 1)], ids=str)
def test_scale_as_tensor_equals_scale_as_float(target, overwrite, scale_shape):
    main_grad, go, x = make_inputs(20, 30, (45,), torch.bfloat16, torch.bfloat16, target[1])
    with_float = run(target, main_grad, go, x, 0.125, overwrite=overwrite)
    with_tensor = run(target, main_grad, go, x, torch.full(scale_shape, 0.125, device=target[1]),
                      overwrite=overwrite)
    # 0.125 is a power of two: scaling is exact, so both forms give the same bits; a
    # 1-element scale of any shape leaves main_grad's shape alone.
    assert with_tensor.shape == main_grad.shape
    torch.testing.assert_close(with_tensor, with_float, rtol=0, atol=0)


def test_strided_operands_equal_contiguous_ones(target):
    device = target[1]
    main_grad, go, x = make_inputs(24, 40, (9, 7), torch.float16, torch.bfloat16, device, seed=5)
    go_strided = go.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    wide = torch.zeros(9, 7, 80, dtype=x.dtype, device=device)
    wide[..., ::2] = x
    x_strided = wide[..., ::2]  # last-dimension stride 2
    assert not go_strided.is_contiguous() and not x_strided.is_contiguous()
    strided = run(target, main_grad, go_strided, x_strided, 0.5)
    contiguous = run(target, main_grad, go, x, 0.5)
    _, bound = exact_and_bound(main_grad, go, x, 0.5)
    assert_within(strided, contiguous.double().cpu(), 2 * bound)


def test_no_tokens_and_empty_buffers(target):
    device = target[1]
    main_grad, go, x = make_inputs(6, 5, (0,), torch.bfloat16, torch.bfloat16, device)
    torch.testing.assert_close(run(target, main_grad, go, x), main_grad, rtol=0, atol=0)
    assert (run(target, main_grad, go, x, overwrite=True) == 0).all()
    empty, go, x = make_inputs(0, 5, (4,), torch.float32, torch.float32, device)
    assert run(target, empty, go, x).shape == (0, 5)


def _bad_cases(device):
    def args(**changes):
        main_grad, go, x = make_inputs(4, 3, (5,), torch.bfloat16, torch.bfloat16, device)
        kwargs = {"main_grad": main_grad, "grad_output": go, "input": x}
        kwargs.update(changes)
        return kwargs

    grad_mode_tensor = torch.zeros(4, 3, device=device, requires_grad=True)
    with torch.inference_mode():
        inference_tensor = torch.zeros(4, 3, device=device)
    shared = torch.zeros(40, device=device)
    return [
        ("bf16 main_grad", args(main_grad=torch.zeros(4, 3, dtype=torch.bfloat16, device=device)),
         TypeError, "main_grad has dtype torch.bfloat16"),
        ("1-D main_grad", args(main_grad=torch.zeros(12, device=device)), ValueError,
         "main_grad must be 2-D [out, in], got shape [12]"),
        ("transposed main_grad", args(main_grad=torch.zeros(3, 4, device=device).t()), ValueError,
         "main_grad is not contiguous"),
        ("out features", args(grad_output=torch.zeros(5, 7, device=device)), ValueError,
         "grad_output has shape [5, 7]: its last dimension must be main_grad.shape[0] = 4"),
        ("in features", args(input=torch.zeros(5, 2, device=device)), ValueError,
         "input has shape [5, 2]: its last dimension must be main_grad.shape[1] = 3"),
        ("tokens", args(input=torch.zeros(6, 3, device=device)), ValueError,
         "grad_output has shape [5, 4] but input has [6, 3]"),
        ("int input", args(input=torch.zeros(5, 3, dtype=torch.int32, device=device)), TypeError,
         "input has dtype torch.int32"),
        ("0-d grad_output", args(grad_output=torch.tensor(1.0, device=device)), ValueError,
         "grad_output must have at least 1 dimension"),
        ("device", args(input=torch.zeros(5, 3, device="meta")), ValueError,
         "input is on meta but main_grad is on"),
        ("requires grad", args(main_grad=grad_mode_tensor), ValueError,
         "main_grad requires grad while grad mode is enabled"),
        ("inference tensor", args(main_grad=inference_tensor), ValueError,
         "main_grad is an inference tensor"),
        ("scale shape", {**args(), "scale": torch.ones(2, device=device)}, ValueError,
         "scale must be a 1-element torch.float32 tensor"),
        ("scale type", {**args(), "scale": "0.5"}, TypeError, "scale must be a Python number"),
        ("overlap", args(main_grad=shared[:12].view(4, 3), input=shared[10:25].view(5, 3)),
         ValueError, "overlaps"),
        # Refused as any tensor that requires grad, on every backend.
        ("scale requires grad", {**args(), "scale": torch.ones(1, device=device, requires_grad=True)},
         ValueError, "scale requires grad"),
        # Messages that named no argument.
        ("main_grad None", args(main_grad=None), TypeError, "main_grad must be a Tensor, got NoneType"),
        ("input a list", args(input=[[1.0, 2.0, 3.0]]), TypeError, "input must be a Tensor, got list"),
        ("sparse grad_output", args(grad_output=torch.ones(5, 4, device=device).to_sparse()), ValueError,
         "grad_output must be a dense (strided) tensor"),
        ("sparse scale", {**args(), "scale": torch.ones(1, device=device).to_sparse()}, ValueError,
         "scale must be a dense (strided) tensor"),
        ("scale beyond floats", {**args(), "scale": 10**400}, ValueError, "scale is beyond the range of a float"),
        ("overwrite not a bool", {**args(), "overwrite": "yes"}, TypeError, "overwrite must be a bool, got str"),
    ]


_BAD_CASE_NAMES = [name for name, *_ in _bad_cases("cpu")]


@pytest.mark.parametrize("case", _BAD_CASE_NAMES)
def test_bad_input_raises_and_changes_nothing(target, case):
    backend, device = target
    _, kwargs, error, fragment = next(c for c in _bad_cases(device) if c[0] == case)
    assert_rejected_unchanged(backend, mbfused.wgrad_accumulate_, kwargs, error, fragment)


@pytest.mark.parametrize("scale", [float("nan"), 0.0, -0.0, float("inf"), float("-inf"), 1e300], ids=str)
@pytest.mark.parametrize("overwrite", [False, True])
def test_special_scales_follow_the_reference(target, scale, overwrite):
    """The reference's ``main_grad + (product * scale)`` in IEEE arithmetic: a nan scale
    makes every element nan, 0 * an infinite or nan product is nan, an infinite scale
    times a zero product is nan. (A GEMM's alpha is no such multiply: the CPU BLAS
    ignored a nan alpha and skipped the product for alpha = 0.) 1e300 is inf in fp32.
    64 x 48 features and 100 tokens: the size at which the CPU BLAS takes the path that
    ignored a nan alpha (smaller products went another way)."""
    _, device = target
    main_grad, go, x = make_inputs(64, 48, (100,), torch.bfloat16, torch.float32, device, seed=2)
    go[3, 2] = float("inf")  # row 2 of the product: inf, and nan where x is 0 or nan
    x[:, 0] = 0.0  # column 0: zero products
    x[7, 4] = float("nan")  # column 4: nan
    main_grad[1, 1], main_grad[5, 3] = float("-inf"), float("nan")
    ours = run(target, main_grad, go, x, scale, overwrite=overwrite)
    theirs = main_grad.clone()
    reference.wgrad_accumulate_(theirs, go, x, scale, overwrite=overwrite)
    # No finite nonzero product survives these scales: the results are exact.
    torch.testing.assert_close(ours.cpu(), theirs.cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("overwrite", [False, True])
def test_no_tokens_give_a_zero_product_times_the_scale(target, overwrite):
    # As in the reference, where the product of no tokens is zeros: 0 * nan is nan.
    main_grad, go, x = make_inputs(6, 5, (0,), torch.bfloat16, torch.bfloat16, target[1])
    assert run(target, main_grad, go, x, float("nan"), overwrite=overwrite).isnan().all()
    result = run(target, main_grad, go, x, -0.0, overwrite=True)
    assert (result == 0).all() and result.signbit().all()  # 0 * -0.0


def test_negative_zero_scale_keeps_its_sign(target):
    # Positive products times -0.0 are -0.0, as in the reference (+0.0 with a +0.0 scale).
    main_grad, go, x = make_inputs(7, 9, (20,), torch.float16, torch.bfloat16, target[1])
    result = run(target, main_grad, go.abs() + 0.5, x.abs() + 0.5, -0.0, overwrite=True)
    assert (result == 0).all() and result.signbit().all()


def test_opcheck(target):
    backend, device = target
    main_grad, go, x = make_inputs(8, 16, (2, 5), torch.bfloat16, torch.float32, device)
    samples = [((main_grad, go, x, 0.5, None), {}),
               ((main_grad, go, x, 1.0, torch.tensor([0.25], device=device)), {"overwrite": True})]
    for args, kwargs in samples:
        with mbfused.use_backend(backend):
            torch.library.opcheck(torch.ops.mbfused.wgrad_accumulate_.default, args, kwargs)


def test_torch_compile_fullgraph(target):
    backend, device = target
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def backward_step(main_grad, go, x, scale):
        mbfused.wgrad_accumulate_(main_grad, go, x, scale)
        return main_grad.sum()

    main_grad, go, x = make_inputs(12, 20, (3, 8), torch.bfloat16, torch.bfloat16, device)
    compiled = main_grad.clone()
    scale = torch.tensor([0.5], device=device)
    with mbfused.use_backend(backend):
        backward_step(compiled, go, x, scale)
    assert_within(compiled, *exact_and_bound(main_grad, go, x, 0.5))
