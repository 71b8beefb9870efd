"""Time per window: MicroBatchTrainer against plain transformers.Trainer, interleaved.

    python bench/trainer_window_time.py [--rounds 3] [--windows 8] [--steps 4]
    torchrun --nproc_per_node 2 bench/trainer_window_time.py      (DDP, gloo)

Both train the same small Llama (random init, fp32) on the same padded micro-batches
with the same TrainingArguments (AdamW, clipping, linear schedule). Runs alternate
(plain, fused, fused, plain, ...) so that load on the machine hits both alike. A
callback stamps the end of every window, in wall-clock and in this process's CPU time
(the figure to trust on a shared machine, where other processes stretch the wall
clock); the first window of each run (warm-up) is left out. Prints the median time per
window of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from mbfused.integrations.transformers import MicroBatchTrainer


class WindowClock(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append((time.perf_counter(), time.process_time()))


def samples(count: int, max_len: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 1024, (int(torch.randint(max_len // 2, max_len + 1, (1,), generator=gen)),),
                            generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def pad(batch: list[dict]) -> dict:
    length = max(len(s["input_ids"]) for s in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    labels = torch.full((len(batch), length), -100)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, s in enumerate(batch):
        n = len(s["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def window_times(trainer_class, windows: int, steps: int, batch: int, out: str) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of every window after the first."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688,
                                         num_hidden_layers=4, num_attention_heads=8,
                                         num_key_value_heads=4, max_position_embeddings=128))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
                             max_grad_norm=1.0, learning_rate=1e-3, max_steps=windows, logging_steps=windows,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    clock = WindowClock()
    trainer = trainer_class(model=model, args=args, train_dataset=samples(windows * steps * batch, 64),
                            data_collator=pad, callbacks=[clock])
    trainer.train()
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(clock.stamps, clock.stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="gradient_accumulation_steps")
    parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is clean)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    transformers.logging.set_verbosity_error()
    times = {Trainer: [], MicroBatchTrainer: []}
    with tempfile.TemporaryDirectory() as out:
        for r in range(options.rounds):
            order = (Trainer, MicroBatchTrainer) if r % 2 == 0 else (MicroBatchTrainer, Trainer)
            for trainer_class in order:
                times[trainer_class] += window_times(trainer_class, options.windows, options.steps,
                                                     options.batch, out)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"time per window ({options.steps} micro-batches of {options.batch}, {len(times[Trainer])} windows "
          f"each, median, {os.environ.get('WORLD_SIZE', '1')} rank(s) of {options.threads} thread(s)):")
    for i, clock in enumerate(("wall", "cpu")):
        plain, fused = (statistics.median(t[i] for t in times[c]) for c in (Trainer, MicroBatchTrainer))
        print(f"  {clock}: Trainer {plain * 1e3:.1f} ms, MicroBatchTrainer {fused * 1e3:.1f} ms, "
              f"ratio {fused / plain:.3f}")


if __name__ == "__main__":
    main()
