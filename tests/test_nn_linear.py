"""mbfused.nn.Linear and convert_linears: the weight gradient accumulated in fp32 by
wgrad_accumulate_, on its own (weight.main_grad) and under MicroBatchOptimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from gloo_ranks import run_ranks

import mbfused
from mbfused.nn import Linear, convert_linears

N = 4


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4),
                               torch.nn.LayerNorm(4)).to(dtype)


def _batches(dtype=torch.float32, count=2 * N, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 5, 8, generator=gen).to(dtype) for _ in range(count)]  # [batch, tokens, in]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_main_grad_it_is_torch_linear(dtype):
    plain = _mlp(dtype)
    ours = convert_linears(copy.deepcopy(plain))
    x = _batches(dtype)[0]
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [plain(xs[0]), ours(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    upstream = torch.randn_like(outs[0])
    for out in outs:
        out.backward(upstream)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name, rtol=0, atol=0)


def test_under_autocast_it_matches_torch_linear():
    plain = _mlp()
    ours = convert_linears(copy.deepcopy(plain))
    x = _batches()[0]
    grads = []
    for model in (plain, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_under_autocast_it_saves_the_cast_input_as_torch_does():
    """An fp32 input (a LayerNorm's output, say) is saved in bf16 for backward, not kept
    in fp32, as torch.nn.Linear does; the weight is saved as the parameter itself (torch
    saves a bf16 copy)."""
    model = convert_linears(_mlp())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        out = model[0](_batches()[0].requires_grad_())
    assert out.dtype == torch.bfloat16
    assert [t.dtype for t in saved] == [torch.bfloat16, torch.float32]
    assert saved[1].data_ptr() == model[0].weight.data_ptr()


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_main_grad_gets_the_exact_fp32_sum_and_grad_stays_none():
    model = convert_linears(_mlp(torch.bfloat16))
    first = model[0]
    first.weight.main_grad = torch.zeros(first.weight.shape)
    exact = torch.zeros(first.weight.shape, dtype=torch.float64)
    captured = {}
    first.register_full_backward_hook(lambda m, gin, gout: captured.update(go=gout[0]))
    for x in _batches(torch.bfloat16, count=3):
        out = model(x)
        out.backward(torch.randn_like(out))
        go = captured["go"].reshape(-1, 32).double()
        exact += go.t() @ x.reshape(-1, 8).double()
    assert first.weight.grad is None
    assert first.bias.grad is not None  # biases keep torch's gradient
    error = (first.weight.main_grad.double() - exact).abs().max().item()
    assert error <= 1e-5 * exact.abs().max().item()


def test_convert_linears_keeps_parameters_and_skips_subclasses():
    class Custom(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)),
                                Custom(2, 2))
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert convert_linears(model) is model
    assert type(model[0]) is Linear and type(model[1][0]) is Linear and type(model[2]) is Custom
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert optimizer.param_groups[0]["params"][0] is model[0].weight
    assert isinstance(model[0], torch.nn.Linear)
    single = torch.nn.Linear(3, 3)
    assert type(convert_linears(single)) is Linear
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        convert_linears([single])


def _reference_window_run(model, optimizer, batches, max_norm):
    params = list(model.parameters())
    main = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for k, x in enumerate(batches):
        model(x).float().square().mean().backward()
        for m, p in zip(main, params):
            m += p.grad.float() / N
            p.grad = None
        if (k + 1) % N == 0:
            for m, p in zip(main, params):
                p.grad = m.to(p.dtype)
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            optimizer.zero_grad()
            main = [torch.zeros_like(m) for m in main]


@pytest.mark.parametrize("mode", ["bucket", "param"])
@pytest.mark.parametrize("fused", [False, True])
def test_under_micro_batch_optimizer_it_matches_the_pure_loop(mode, fused):
    """fp32 model: the weight gradients skip .grad and land in the wrapper's buffers."""
    plain = _mlp()
    ours = convert_linears(copy.deepcopy(plain))
    batches = _batches()
    _reference_window_run(plain, torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=fused),
                          batches, max_norm=0.1)
    opt = mbfused.MicroBatchOptimizer(torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=fused), N,
                                      max_grad_norm=0.1, mode=mode, bucket_mb=1e-6)
    seen_weight_grads = []
    for x in batches:
        ours(x).float().square().mean().backward()
        seen_weight_grads.append(ours[0].weight.grad)
        opt.step()
        opt.zero_grad()
    assert all(g is None for g in seen_weight_grads), "the weight gradient is never materialised"
    assert opt.last_grad_norm > 0.1, "the case must clip"
    for (name, p), q in zip(plain.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_model_under_the_wrapper_is_closer_to_exact():
    """bf16 parameters: the wrapper's weight gradient is the fp32 sum of exact products,
    where the pure loop first rounds every micro-batch's weight gradient to bf16."""
    model = convert_linears(_mlp(torch.bfloat16))
    batches = _batches(torch.bfloat16, count=N)
    opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), N)
    exact = torch.zeros(model[2].weight.shape, dtype=torch.float64)
    rounded = torch.zeros(model[2].weight.shape, dtype=torch.float32)
    probe = copy.deepcopy(model)
    probe[2].__class__ = torch.nn.Linear  # the pure path: a bf16 weight gradient per micro-batch
    captured, seen = {}, {}
    probe[2].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    probe[2].register_full_backward_hook(lambda m, gin, gout: captured.update(go=gout[0]))
    opt.optimizer.step = lambda: seen.update(buffer=opt._window.slots[2].buffer.clone())
    for x in batches:
        probe(x).float().square().mean().backward()
        # The buffer holds the window's sum; its 1/N comes at the window's end.
        exact += captured["go"].reshape(-1, 4).double().t() @ captured["x"].reshape(-1, 32).double()
        rounded += probe[2].weight.grad.float()
        probe.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    ours_error = (seen["buffer"].double() - exact).abs().max().item()
    pure_error = (rounded.double() - exact).abs().max().item()
    assert ours_error <= 1e-5 * exact.abs().max().item()
    assert ours_error * 100 < pure_error


def test_an_inf_in_a_weight_gradient_skips_the_window():
    """Only the weight gradient is non-finite (an inf input whose output gets a zero
    gradient: 0 * inf = nan in grad_output^T @ input, every other gradient finite), so
    only the end-of-window norm check can catch it: wgrad_accumulate_ has no found_inf."""
    model = convert_linears(torch.nn.Linear(8, 4))
    before = copy.deepcopy(model.state_dict())
    opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    batches = _batches(count=N)
    batches[2] = batches[2].clone()
    batches[2][0, 0, 0] = float("inf")
    for x in batches:
        (model(x) * 0).sum().backward()
        stepped = opt.step()
        opt.zero_grad()
    assert not stepped and opt.last_step_skipped
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for x in _batches(count=N, seed=2):
        model(x).square().mean().backward()
        stepped = opt.step()
        opt.zero_grad()
    assert stepped and not opt.last_step_skipped


@pytest.mark.parametrize("drive", ["wrapper", "scaler every micro-batch"])
def test_an_inf_only_in_weight_gradients_backs_a_grad_scaler_off(drive):
    """Bias-free converted Linears: every gradient goes into main_grad, unchecked by the
    per-micro-batch flag. A scaler updated after every micro-batch never heard of the
    window's inf: the scale stayed, and every window was skipped."""
    model = convert_linears(torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.Tanh(),
                                                torch.nn.Linear(16, 4, bias=False)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=1000)
    opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler)
    scales = []
    for k, x in enumerate(_batches(count=2 * N)):
        loss = model(x).square().mean() * (float("inf") if k in (1, N + 1) else 1.0)
        scaler.scale(loss).backward()
        if drive == "wrapper":
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        if opt.micro_step == 0:
            assert opt.last_step_skipped
            scales.append(scaler.get_scale())
    assert scales == [2.0 ** 15, 2.0 ** 14]


def test_a_closed_wrapper_leaves_the_gradient_to_torch():
    model = convert_linears(_mlp())
    opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    opt.close()
    model(_batches()[0]).sum().backward()
    assert model[0].weight.grad is not None


def test_a_compiled_model_under_the_wrapper_equals_eager():
    base = _mlp()
    results = []
    for compiled in (False, True):
        model = convert_linears(copy.deepcopy(base))
        opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, max_grad_norm=0.5)
        forward = torch.compile(model) if compiled else model
        for x in _batches(count=4):
            forward(x).square().sum().backward()
            assert model[0].weight.grad is None
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("route", ["wrapper", "main_grad"])
def test_gradients_asked_for_other_tensors_leave_the_weight_alone(route):
    """torch.autograd.grad(out, x) and backward(inputs=[x]) compute no weight gradient with
    torch.nn.Linear; the fp32 routes must not write one either."""
    model = convert_linears(torch.nn.Linear(8, 4))
    if route == "wrapper":
        opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, mode="param")
        target = opt._window.slots[0]
        written = lambda: target.written  # noqa: E731
    else:
        model.weight.main_grad = torch.zeros(4, 8)
        written = lambda: bool(model.weight.main_grad.any())  # noqa: E731
    x = torch.randn(3, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x).square().sum(), x)
    assert gx.shape == x.shape and not written()
    model(x).square().sum().backward(inputs=[x])
    assert not written() and model.weight.grad is None
    model(x).square().sum().backward()
    assert written()


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_a_weight_with_both_kinds_of_gradient_is_clipped_by_its_whole_norm(mode):
    """Per micro-batch, a loss with a direct use of a Linear's weight (its gradient arrives
    as .grad and is accumulated by accumulate_, which sums the norm) and one through the
    Linear (wgrad_accumulate_ adds to the same buffer and sums no norm). The window must
    clip by the whole norm."""
    torch.manual_seed(0)
    lin = Linear(8, 8)
    plain = copy.deepcopy(lin)
    plain.__class__ = torch.nn.Linear
    batches = _batches(count=N)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    main = [torch.zeros_like(p) for p in plain.parameters()]
    for x in batches:
        (x @ plain.weight.t()).square().mean().backward()
        plain(x).square().mean().backward()
        for m, p in zip(main, plain.parameters()):
            m += p.grad / N
            p.grad = None
    for m, p in zip(main, plain.parameters()):
        p.grad = m
    reference_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
    plain_opt.step()

    opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), N,
                                      max_grad_norm=0.1, mode=mode, bucket_mb=1e-6)
    for x in batches:
        ((x @ lin.weight.t()).square().mean() + lin(x).square().mean()).backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(opt.last_grad_norm, reference_norm, rtol=1e-5, atol=0)
    for (name, p), q in zip(plain.named_parameters(), lin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


class _Expert(torch.nn.Module):
    """A Linear that only rank 0 uses (an expert), and a scale every rank uses."""

    def __init__(self):
        super().__init__()
        self.expert = Linear(8, 4)
        self.shared = torch.nn.Parameter(torch.ones(8))

    def forward(self, x, use_expert):
        return self.expert(x) if use_expert else (x * self.shared).sum(-1)


def _unchecked_gradient_worker(rank, world, path, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _Expert()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2,
                                          process_group=dist.group.WORLD)
        for k, x in enumerate(_batches(count=2, seed=rank)):
            if rank == 0 and k == 1:
                x = x.clone()
                x[0, 0, 0] = float("inf")  # only the expert's weight gradient is nan
                (model(x, use_expert=True) * 0).sum().backward()
            else:
                model(x, use_expert=False).square().mean().backward()
            stepped = opt.step()
            opt.zero_grad()
        results[rank] = (stepped, all(torch.equal(v, before[k]) for k, v in model.state_dict().items()))
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_agree_to_skip_an_unchecked_nan(tmp_path):
    """wgrad_accumulate_ has no inf/nan flag, so the norm decides; every rank must check it
    when any rank took such gradients, or the replicas diverge."""
    results = run_ranks(_unchecked_gradient_worker, 2, 2, tmp_path / "store")
    assert results == {0: (False, True), 1: (False, True)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_under_autocast_and_the_wrapper():
    plain = _mlp().cuda()
    ours = convert_linears(copy.deepcopy(plain))
    batches = [x.cuda() for x in _batches()]
    opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(ours.parameters(), lr=0.1), N, max_grad_norm=0.1)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    main = [torch.zeros_like(p) for p in plain.parameters()]
    for k, x in enumerate(batches):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_plain = plain(x).float().square().mean()
            loss_ours = ours(x).float().square().mean()
        loss_plain.backward()
        loss_ours.backward()
        for m, p in zip(main, plain.parameters()):
            m += p.grad / N
            p.grad = None
        opt.step()
        opt.zero_grad()
        if (k + 1) % N == 0:
            for m, p in zip(main, plain.parameters()):
                p.grad = m
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
            plain_opt.step()
            main = [torch.zeros_like(m) for m in main]
    # The fused path's weight gradients are exact fp32 products; torch's are bf16 GEMMs.
    for (name, p), q in zip(plain.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=2e-2, atol=2e-3, msg=name)


class _TiedLM(torch.nn.Module):
    """nanoGPT's tie: the output Linear's weight is the embedding's."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.emb(tokens)))).logsumexp(-1).mean()


def _masked_run(model, batches, wrapped, mode="bucket"):
    """Only the embedding rows >= 8 train (the 'new tokens' pattern): a mask hook on the
    tied weight, and a scaling one on the body's weight."""
    mask = torch.zeros(16, 1)
    mask[8:] = 1.0
    model.emb.weight.register_hook(lambda g: g * mask)
    model.body.weight.register_hook(lambda g: g * 0.25)
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    opt = mbfused.MicroBatchOptimizer(inner, N, mode=mode) if wrapped else inner
    for k, tokens in enumerate(batches):
        if wrapped:
            model(tokens).backward()
            opt.step()
            opt.zero_grad()
        else:
            (model(tokens) / N).backward()
            if (k + 1) % N == 0:
                opt.step()
                opt.zero_grad()


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_hooks_on_a_weight_see_its_whole_gradient(mode):
    """A weight with hooks gets its gradient through autograd, whole (the tied embedding's
    and the Linear's summed), as with torch.nn.Linear: written into main_grad instead,
    the hooks would have missed the Linear's part."""
    torch.manual_seed(0)
    base = _TiedLM()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 16, (4, 6), generator=gen) for _ in range(2 * N)]
    plain, ours = copy.deepcopy(base), convert_linears(copy.deepcopy(base))
    _masked_run(plain, batches, wrapped=False)
    _masked_run(ours, batches, wrapped=True, mode=mode)
    assert torch.equal(ours.emb.weight[:8], base.emb.weight[:8]), "masked rows must not move"
    assert not torch.equal(ours.emb.weight[8:], base.emb.weight[8:])
    for (name, p), q in zip(plain.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_a_hooked_weight_with_a_main_grad_of_its_own_gets_its_gradient_through_autograd():
    model = convert_linears(torch.nn.Linear(8, 4))
    model.weight.main_grad = torch.zeros(4, 8)
    seen = []
    model.weight.register_hook(lambda g: seen.append(g) or g * 0.5)
    plain = torch.nn.Linear(8, 4)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 8)
    model(x).square().sum().backward()
    (plain(x).square().sum() * 0.5).backward()
    assert len(seen) == 1 and seen[0] is not None
    torch.testing.assert_close(model.weight.grad, plain.weight.grad, rtol=0, atol=0)
    assert not model.weight.main_grad.any()


@pytest.mark.parametrize("route", ["wrapper", "main_grad"])
def test_autograd_grad_of_a_weight_returns_torch_linears_gradient(route):
    """torch.autograd.grad(loss, [weight]) (gradient penalties, PCGrad) returns the
    gradient, differentiable under create_graph, and writes nothing into main_grad."""
    torch.manual_seed(0)
    model = convert_linears(torch.nn.Linear(8, 4))
    plain = copy.deepcopy(model)
    plain.__class__ = torch.nn.Linear
    if route == "wrapper":
        opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, mode="param")
        written = lambda: opt._window.slots[0].written  # noqa: E731
    else:
        model.weight.main_grad = torch.zeros(4, 8)
        written = lambda: bool(model.weight.main_grad.any())  # noqa: E731
    x = torch.randn(3, 8)
    ours = torch.autograd.grad(model(x).square().sum(), [model.weight], create_graph=True)[0]
    want = torch.autograd.grad(plain(x).square().sum(), [plain.weight], create_graph=True)[0]
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    assert ours.requires_grad and not written()
    (penalty,) = torch.autograd.grad(ours.square().sum(), [model.bias])
    (want_penalty,) = torch.autograd.grad(want.square().sum(), [plain.bias])
    torch.testing.assert_close(penalty, want_penalty, rtol=0, atol=0)


def test_a_saved_tensor_hook_that_copies_the_weight_keeps_the_main_grad_route():
    """Offloading saved tensors (torch.autograd.graph.save_on_cpu, HF's offloaded
    checkpointing) hands backward a copy of the weight: main_grad is the parameter's."""
    model = convert_linears(torch.nn.Linear(8, 4))
    model.weight.main_grad = torch.zeros(4, 8)
    plain = copy.deepcopy(model)
    plain.__class__ = torch.nn.Linear
    x = torch.randn(3, 8)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        model(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert model.weight.grad is None
    torch.testing.assert_close(model.weight.main_grad, plain.weight.grad, rtol=1e-6, atol=1e-6)


def test_a_converted_model_compiles_with_fullgraph():
    """Against torch.nn.Linear compiled the same way (inductor's fusions round as they do)."""
    torch._dynamo.reset()  # what other tests compiled must not decide how this one traces
    model = _mlp()
    plain = copy.deepcopy(model)
    x = _batches()[0]
    torch.compile(convert_linears(model), fullgraph=True)(x).square().sum().backward()
    torch.compile(plain, fullgraph=True)(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_sixteen_bit_main_grad_of_the_users_own_is_added_into(dtype):
    """Megatron without fp32 gradient accumulation: main_grad in the parameters' 16-bit
    dtype gets each weight gradient added, rounded to it."""
    model = convert_linears(torch.nn.Linear(8, 4).to(dtype))
    model.weight.main_grad = torch.zeros(4, 8, dtype=dtype)
    model.weight.grad_added_to_main_grad = False
    plain = copy.deepcopy(model)
    plain.__class__ = torch.nn.Linear
    expected = torch.zeros(4, 8, dtype=dtype)
    for x in _batches(dtype, count=3):
        model(x).float().square().sum().backward()
        plain(x).float().square().sum().backward()
        expected += plain.weight.grad
        plain.weight.grad = None
    assert model.weight.grad is None and model.weight.grad_added_to_main_grad
    torch.testing.assert_close(model.weight.main_grad, expected, rtol=0, atol=0)
