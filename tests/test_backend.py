"""Backend selection: available_backends, use_backend, MBFUSED_BACKEND, `python -m mbfused info`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mbfused
from mbfused._backend import backend_for


def test_available_backends_lists_every_backend_with_a_reason_or_none():
    backends = mbfused.available_backends()
    assert set(backends) == {"cuda", "triton", "cpu", "torch"}
    assert backends["torch"] is None
    for reason in backends.values():
        assert reason is None or (isinstance(reason, str) and reason)
    if not torch.cuda.is_available():
        assert backends["cuda"] is not None


def test_triton_tests_cannot_be_silently_skipped():
    # triton ships with torch's Linux wheels; without a GPU the conftest switches the
    # interpreter on, so the triton backend must be usable here and its tests must run.
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        assert mbfused.available_backends()["triton"] is None


def test_auto_prefers_cpu_backend_for_cpu_tensors():
    expected = "cpu" if mbfused.available_backends()["cpu"] is None else "torch"
    assert backend_for(torch.device("cpu")) == expected


def test_use_backend_overrides_and_nests():
    cpu = torch.device("cpu")
    with mbfused.use_backend("torch"):
        assert backend_for(cpu) == "torch"
        with mbfused.use_backend("auto"):
            assert backend_for(cpu) != "torch" or mbfused.available_backends()["cpu"] is not None
        assert backend_for(cpu) == "torch"


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("MBFUSED_BACKEND", "torch")
    assert backend_for(torch.device("cpu")) == "torch"
    with mbfused.use_backend("auto"):
        assert backend_for(torch.device("cpu")) in ("cpu", "torch")


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"), mbfused.use_backend("gpu"):
        pass
    monkeypatch.setenv("MBFUSED_BACKEND", "fast")
    with pytest.raises(ValueError, match="MBFUSED_BACKEND must be one of"):
        backend_for(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_explicit_backend_that_cannot_run_raises_with_reason():
    acc = [torch.zeros(4)]
    with mbfused.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors"):
        mbfused.accumulate_(acc, [torch.ones(4)])
    assert torch.equal(acc[0], torch.zeros(4))


def test_info_command_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "mbfused", "info"], check=True,
                         capture_output=True, text=True).stdout
    assert f"mbfused {mbfused.__version__}" in out
    assert f"torch {torch.__version__}" in out
    for name in ("cuda", "triton", "cpu", "torch"):
        assert f"  {name}:" in out


def test_import_says_nothing_where_numpy_is_missing():
    # torch warns "Failed to initialize NumPy" on import without numpy; mbfused does not
    # use numpy. (None in sys.modules makes `import numpy` fail as if it were missing.)
    code = "import sys; sys.modules['numpy'] = None; import mbfused"
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], check=True,
                          capture_output=True, text=True)
    assert "NumPy" not in proc.stderr, proc.stderr


def test_import_never_imports_a_framework():
    """The integrations' frameworks are optional: importing mbfused (and its planner and
    CLI) loads none of them; importing an integration loads its own only."""
    frameworks = ("transformers", "accelerate", "lightning", "pytorch_lightning")
    code = ("import sys, mbfused, mbfused.__main__, mbfused.planner, mbfused.integrations; "
            f"print([m for m in {frameworks!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", out


def _backward_on_another_thread(loss):
    """Runs loss.backward() on a fresh thread, as the autograd engine runs CUDA work on a
    device thread of its own, where the caller's context variables are not set."""
    import threading

    errors = []

    def run():
        try:
            loss.backward()
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "backward did not finish"
    if errors:
        raise errors[0]


@pytest.fixture
def backends_used(monkeypatch):
    """The backend each op call asked for, recorded where the op picks it."""
    from mbfused import _backend, ops

    used = []

    def recording(device):
        used.append(_backend.requested_backend())
        return backend_for(device)

    monkeypatch.setattr(ops, "backend_for", recording)
    return used


def test_nn_linear_backward_keeps_the_backend_of_its_forward(backends_used):
    layer = mbfused.nn.Linear(6, 4)
    layer.weight.main_grad = torch.zeros(4, 6)
    with mbfused.use_backend("torch"):
        loss = layer(torch.randn(3, 6)).sum()
    _backward_on_another_thread(loss)
    assert backends_used and set(backends_used) == {"torch"}
    assert torch.count_nonzero(layer.weight.main_grad) > 0


def test_wrapper_backward_hooks_keep_the_backend_of_its_last_step(backends_used):
    model = torch.nn.Linear(6, 4)
    opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4, mode="bucket")
    with mbfused.use_backend("torch"):
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
    backends_used.clear()
    _backward_on_another_thread(model(torch.randn(3, 6)).sum())
    assert backends_used and set(backends_used) == {"torch"}  # the hook's accumulate_
    with mbfused.use_backend("auto"):
        opt.step()
    assert opt.micro_step == 2


@pytest.mark.parametrize(("triton_version", "numpy_version", "refused"), [
    ("3.6.0", "2.4.1", True),
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.1", False),
    ("3.8.0+git1234", "2.5.0", False),
])
def test_interpreter_refused_where_triton_cannot_run_with_numpy(monkeypatch, triton_version,
                                                                numpy_version, refused):
    # Triton before 3.7 calls int() on 1-element arrays, which NumPy 2.4 refuses: every
    # interpreted kernel would fail deep inside Triton instead of saying why up front.
    import importlib.metadata

    from mbfused import _backend

    versions = {"triton": triton_version, "numpy": numpy_version}
    monkeypatch.setattr(importlib.metadata, "version", versions.__getitem__)
    reason = _backend._interpreter_error.__wrapped__()
    if refused:
        assert f"Triton {triton_version}" in reason and f"NumPy {numpy_version}" in reason
        assert "numpy<2.4 or triton>=3.7" in reason
    else:
        assert reason is None


def test_the_interpreter_turned_on_after_triton_was_imported_is_named():
    script = ("import os, torch, triton.language, mbfused\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "print(mbfused.available_backends()['triton'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TRITON_INTERPRET=1 was set after triton was imported" in proc.stdout


def test_use_backend_without_with_warns_and_a_bad_name_raises_at_once():
    with pytest.warns(RuntimeWarning, match=r"use_backend\('torch'\) was called but never entered"):
        mbfused.use_backend("torch")
        import gc

        gc.collect()
    with pytest.raises(ValueError, match="backend must be one of"):
        mbfused.use_backend("gpu")
    from mbfused._backend import requested_backend

    before = requested_backend()
    choice = mbfused.use_backend("torch")
    with choice, choice:  # nests, as before
        assert backend_for(torch.device("cpu")) == "torch"
    assert requested_backend() == before


def test_use_backend_decorates_a_function():
    from mbfused._backend import requested_backend

    @mbfused.use_backend("torch")
    def inside():
        return requested_backend()

    assert inside() == inside() == "torch"
    assert requested_backend() != "torch" or os.environ.get("MBFUSED_BACKEND") == "torch"
