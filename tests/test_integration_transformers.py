"""MicroBatchTrainer against plain transformers.Trainer with the same TrainingArguments.

Each comparison sits next to a noise floor: plain Trainer against itself with the same
math in another order (per_device_train_batch_size halved, gradient_accumulation_steps
doubled: the same samples per window, summed in another grouping). MicroBatchTrainer
must land within a few times that floor of plain Trainer.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from readme_sections import first_python_block

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from mbfused import MicroBatchOptimizer, WindowMisuse  # noqa: E402
from mbfused.integrations.transformers import MicroBatchTrainer  # noqa: E402

transformers.logging.set_verbosity_error()

SAMPLES = 26        # 13 micro-batches of 2: windows of 3, 3, 3, 3 and a short one of 1
BATCH, STEPS = 2, 3
MAX_GRAD_NORM = 0.5  # below the windows' norms: clipping is active
FLOOR_FACTOR = 4


def token_data(n: int = SAMPLES, seed: int = 0) -> list[dict]:
    """Sequences of 3 to 11 tokens: micro-batches of different token counts, padded."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        ids = torch.randint(0, 64, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen)
        samples.append({"input_ids": ids, "labels": ids.clone()})
    return samples


def pad(batch: list[dict]) -> dict:
    """Right padding; padded labels are -100 (not counted, no loss)."""
    length = max(len(s["input_ids"]) for s in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    labels = torch.full((len(batch), length), -100)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, s in enumerate(batch):
        n = len(s["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def tiny_llama() -> torch.nn.Module:
    """Accepts Trainer's num_items_in_batch: the loss is normalised by the window's tokens."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=32))


class Regressor(torch.nn.Module):
    """A model without loss kwargs: Trainer divides each micro-batch's mean loss by the
    window's micro-batch count."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        return {"loss": (out - labels).square().mean(), "logits": out}


def regression_data(n: int = SAMPLES) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    y = x.sum(1) * 3
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


MODELS = {"llama": (tiny_llama, token_data, pad), "regressor": (Regressor, regression_data, None)}


def arguments(out: Path, batch: int = BATCH, steps: int = STEPS, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
                    max_grad_norm=MAX_GRAD_NORM, learning_rate=1e-2, num_train_epochs=1, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                    lr_scheduler_type="linear")
    settings.update(overrides)
    return TrainingArguments(**settings)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train(trainer_class, model_name: str, out: Path, optimizers=None, resume=None, callbacks=None,
          samples: int = SAMPLES, eval_samples: int = 0, **overrides):
    make_model, make_data, collate = MODELS[model_name]
    model = make_model()
    kwargs = {} if optimizers is None else {"optimizers": optimizers(model)}
    if eval_samples:
        kwargs["eval_dataset"] = make_data(eval_samples)[::-1]
    trainer = trainer_class(model=model, args=arguments(out, **overrides), train_dataset=make_data(samples),
                            data_collator=collate, callbacks=callbacks, **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, flat(model)


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "grad_norm" in entry]


def assert_within_noise_floor(name, tmp_path, optimizers=None, **overrides):
    """MicroBatchTrainer vs plain Trainer, next to plain Trainer vs itself in another order."""
    plain, p_plain = train(Trainer, name, tmp_path / "plain", optimizers, **overrides)
    fused, p_fused = train(MicroBatchTrainer, name, tmp_path / "fused", optimizers, **overrides)
    _, p_other = train(Trainer, name, tmp_path / "other", optimizers, batch=BATCH // 2, steps=STEPS * 2,
                       **overrides)
    diff = (p_fused - p_plain).abs().max().item()
    floor = (p_other - p_plain).abs().max().item()
    moved = (p_plain - flat(MODELS[name][0]())).abs().max().item()
    print(f"{name} {overrides}: |fused - plain| {diff:.3g}, noise floor {floor:.3g}, moved {moved:.3g}")
    assert moved > 100 * floor  # the runs trained
    assert diff <= FLOOR_FACTOR * floor, (diff, floor)
    return plain, fused


@pytest.mark.parametrize("name, optim", [("llama", "adamw_torch"), ("llama", "sgd"),
                                         ("regressor", "sgd"), ("regressor", "adamw_torch")])
def test_parameters_and_logs_match_plain_trainer(tmp_path, name, optim):
    plain, fused = assert_within_noise_floor(name, tmp_path, optim=optim)
    windows = -(-SAMPLES // BATCH // STEPS)
    assert fused.state.global_step == plain.state.global_step == windows
    logs, plain_logs = step_logs(fused), step_logs(plain)
    assert [e["step"] for e in logs] == [e["step"] for e in plain_logs] == list(range(1, windows + 1))
    for mine, theirs in zip(logs, plain_logs, strict=True):
        assert mine["learning_rate"] == theirs["learning_rate"]  # the schedule counts windows
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    assert all(e["grad_norm"] > MAX_GRAD_NORM for e in logs)  # every window was clipped
    wrapper = fused.micro_batch_optimizer
    assert isinstance(wrapper, MicroBatchOptimizer) and wrapper.max_grad_norm == MAX_GRAD_NORM
    assert wrapper.accumulation_steps == STEPS and wrapper.micro_step == 0


def test_evaluation_during_training_changes_nothing(tmp_path):
    """eval_steps between windows: the evaluation runs on the window's parameters, as in
    plain Trainer, and training goes on as if it had not run."""
    plain, fused = assert_within_noise_floor("regressor", tmp_path, eval_samples=8, eval_strategy="steps",
                                             eval_steps=2)
    evals, plain_evals = ([e for e in t.state.log_history if "eval_loss" in e] for t in (fused, plain))
    assert [e["step"] for e in evals] == [e["step"] for e in plain_evals] and len(evals) >= 2
    for mine, theirs in zip(evals, plain_evals, strict=True):
        assert mine["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)


def test_a_users_optimizer_and_scheduler_are_wrapped(tmp_path):
    def optimizers(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda window: 1 / (1 + window))

    _, fused = assert_within_noise_floor("llama", tmp_path, optimizers)
    assert isinstance(fused.micro_batch_optimizer.optimizer, torch.optim.AdamW)
    assert [e["learning_rate"] for e in step_logs(fused)] == pytest.approx([1e-2 / (1 + w) for w in range(5)])


def test_without_clipping_the_logged_norm_is_the_windows(tmp_path):
    plain, _ = train(Trainer, "regressor", tmp_path / "plain", max_grad_norm=0.0)
    fused, _ = train(MicroBatchTrainer, "regressor", tmp_path / "fused", max_grad_norm=0.0)
    assert fused.micro_batch_optimizer.max_grad_norm is None
    assert [e["grad_norm"] for e in step_logs(fused)] == pytest.approx(
        [e["grad_norm"] for e in step_logs(plain)], rel=1e-4)


class Stop(Exception):
    pass


class Interrupt(TrainerCallback):
    """Stops training in the middle of a window (after its first micro-batch)."""

    def __init__(self, at_window: int) -> None:
        self.at_window = at_window

    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_window:
            raise Stop


def test_resume_after_an_interruption_mid_window_is_bit_exact(tmp_path):
    _, uninterrupted = train(MicroBatchTrainer, "llama", tmp_path / "a", save_strategy="steps", save_steps=2)
    with pytest.raises(Stop):
        train(MicroBatchTrainer, "llama", tmp_path / "b", callbacks=[Interrupt(3)], save_strategy="steps",
              save_steps=2)
    checkpoint = tmp_path / "b" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["mbfused"]["accumulation_steps"] == STEPS and saved["mbfused"]["micro_step"] == 0
    resumed_trainer, resumed = train(MicroBatchTrainer, "llama", tmp_path / "b", resume=str(checkpoint),
                                     save_strategy="steps", save_steps=2)
    assert torch.equal(resumed, uninterrupted)
    assert resumed_trainer.state.global_step == 5


def test_a_half_finished_window_in_a_checkpoint_is_accumulated_again(tmp_path):
    """Trainer resumes at a window's first micro-batch: a checkpoint written mid-window
    (by a callback of the user's) must not count that window's micro-batches twice."""
    trainer, _ = train(MicroBatchTrainer, "regressor", tmp_path / "a")
    wrapper = trainer.micro_batch_optimizer
    trainer.model(**pad_free(regression_data()[:2]))["loss"].backward()
    wrapper.step()
    half = wrapper.state_dict()
    assert half["mbfused"]["micro_step"] == 1
    wrapper.zero_grad()
    trainer.optimizer.load_state_dict(half)
    assert wrapper.micro_step == 0


def pad_free(batch: list[dict]) -> dict:
    return torch.utils.data.default_collate(batch)


def test_settings_it_cannot_honour_are_refused(tmp_path):
    args = arguments(tmp_path)
    args.fp16 = True
    with pytest.raises(ValueError, match="fp16"):
        MicroBatchTrainer(model=Regressor(), args=args, train_dataset=regression_data())
    model = Regressor()
    wrapper = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), STEPS)
    with pytest.raises(TypeError, match="optimizers"):
        MicroBatchTrainer(model=model, args=arguments(tmp_path), train_dataset=regression_data(),
                          optimizers=(wrapper, None))


def test_trainer_framework_accumulation_cannot_step_without_a_window(tmp_path):
    trainer, _ = train(MicroBatchTrainer, "regressor", tmp_path)
    with pytest.raises(WindowMisuse, match="without an accumulation window"):
        trainer.optimizer.step()


# -- two ranks under DDP ------------------------------------------------------------------

WORLD = 2
# Accelerate hands whole micro-batches to the ranks in turn (and wraps around at the end):
# with windows of 2 micro-batches of 2 samples and 24 samples, the plain run in another
# order (1 sample, 4 micro-batches) puts the same 8 samples in each window.
DDP_SAMPLES, DDP_STEPS = 24, 2


def _ddp_worker(rank: int, port: int, out: str, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    transformers.logging.set_verbosity_error()
    out = Path(out)
    runs = {}
    for label, trainer_class, batch, steps in (("plain", Trainer, BATCH, DDP_STEPS),
                                               ("fused", MicroBatchTrainer, BATCH, DDP_STEPS),
                                               ("other", Trainer, BATCH // 2, DDP_STEPS * 2)):
        trainer, params = train(trainer_class, "llama", out / label, samples=DDP_SAMPLES, batch=batch,
                                steps=steps, ddp_backend="gloo", ddp_timeout=120)
        runs[label] = params
        if label == "fused":
            results[f"ddp{rank}"] = type(trainer.micro_batch_optimizer.model).__name__
            results[f"steps{rank}"] = trainer.state.global_step
    results[rank] = runs


def test_two_ranks_under_ddp_match_plain_trainer(tmp_path):
    from gloo_ranks import run_ranks

    with socket.socket() as probe:  # a free port for the ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = run_ranks(_ddp_worker, WORLD, port, str(tmp_path))
    assert results["ddp0"] == results["ddp1"] == "DistributedDataParallel"
    assert results["steps0"] == DDP_SAMPLES // WORLD // BATCH // DDP_STEPS
    zero, one = results[0], results[1]
    assert torch.equal(zero["fused"], one["fused"])  # ranks stay identical
    diff = (zero["fused"] - zero["plain"]).abs().max().item()
    floor = (zero["other"] - zero["plain"]).abs().max().item()
    print(f"DDP x{WORLD}: |fused - plain| {diff:.3g}, noise floor {floor:.3g}")
    assert diff <= FLOOR_FACTOR * floor, (diff, floor)


# -- the README's example -------------------------------------------------------------------

def test_the_readme_example_trains(tmp_path):
    code = first_python_block("Hugging Face Trainer")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^window +\d+: loss ([0-9.]+), grad norm", proc.stdout, re.M)]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.75, proc.stdout[-3000:]
    assert sorted(p.name for p in tmp_path.joinpath("out").iterdir()) == ["checkpoint-4", "checkpoint-8"]
