"""scale_grad: identity forward, gradient multiplied by scale in backward."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import mbfused


@pytest.mark.parametrize("scale", [0.25, -3.0, torch.tensor(0.25), torch.tensor([0.25]),
                                   torch.tensor([[[0.25]]])], ids=["float", "negative", "0-d", "[1]", "[1,1,1]"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_identity_forward_scaled_backward(scale, dtype):
    x = torch.randn(4, 5, dtype=dtype, requires_grad=True)
    y = mbfused.scale_grad(x, scale)
    assert torch.equal(y, x) and y.shape == x.shape and y.dtype == dtype
    upstream = torch.randn(4, 5, dtype=dtype)
    y.backward(upstream)
    s = float(scale) if not isinstance(scale, torch.Tensor) else scale.item()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(x.grad, upstream * s, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_a_tensor_scale_rounds_like_a_number(dtype):
    """1/3 is not exact in any dtype: the tensor scale must not be rounded to the
    gradient's dtype before the product (torch computes a number's product in fp32)."""
    x = torch.randn(10_000, dtype=dtype, requires_grad=True)
    upstream = torch.randn(10_000, dtype=dtype)
    grads = []
    for scale in (1 / 3, torch.tensor([1 / 3])):
        x.grad = None
        mbfused.scale_grad(x, scale).backward(upstream)
        grads.append(x.grad)
    if dtype == torch.float64:  # a number stays fp64, the tensor holds fp32's 1/3
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-7, atol=0)
    else:
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_gradients_of_a_model_arrive_scaled():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x = torch.randn(8, 6)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = mbfused.scale_grad(model(x).square().sum(), 1 / 8)
    torch.testing.assert_close(loss, model(x).square().sum())  # the reported loss is unchanged
    loss.backward()
    for p, g in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, g / 8, rtol=1e-6, atol=0)


def test_no_gradient_flows_to_a_tensor_scale():
    x = torch.ones(3, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    mbfused.scale_grad(x, scale).sum().backward()
    assert scale.grad is None
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_compiles_with_a_tensor_scale_without_recompiling():
    x = torch.randn(5, requires_grad=True)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def f(x, s):
        return mbfused.scale_grad(x * 2, s).sum()

    for value in (0.5, 0.25):
        x.grad = None
        f(x, torch.tensor(value)).backward()
        torch.testing.assert_close(x.grad, torch.full((5,), 2 * value))
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "x, scale, error, message",
    [
        ([1.0], 1.0, TypeError, "x must be a Tensor"),
        (torch.ones(2, dtype=torch.int64), 1.0, ValueError, "x must be a floating-point tensor"),
        (torch.ones(2), "2", TypeError, "scale must be a Python number"),
        (torch.ones(2), True, TypeError, "scale must be a Python number"),
        (torch.ones(2), torch.ones(2), ValueError, r"scale must be .* got shape \[2\]"),
        (torch.ones(2), torch.ones(1, dtype=torch.int32), ValueError, "dtype torch.int32"),
    ],
)
def test_bad_arguments(x, scale, error, message):
    with pytest.raises(error, match=message):
        mbfused.scale_grad(x, scale)


def test_a_tensor_scale_is_read_when_scale_grad_runs():
    # One scale tensor refilled per micro-batch, the losses summed before one backward:
    # each micro-batch keeps its own scale.
    weight = torch.ones(3, requires_grad=True)
    scale = torch.zeros(1)
    total = 0
    for value in (0.25, 0.75):
        scale.fill_(value)
        total = total + mbfused.scale_grad((weight * value).sum(), scale)
    total.backward()
    assert torch.equal(weight.grad, torch.full((3,), 0.25 * 0.25 + 0.75 * 0.75))
    with torch.inference_mode():
        frozen = torch.tensor(0.5)
    weight.grad = None
    mbfused.scale_grad(weight.sum(), frozen).backward()  # a scale made under inference_mode
    assert torch.equal(weight.grad, torch.full((3,), 0.5))
