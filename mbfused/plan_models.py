"""Models for ``python -m mbfused plan``: built-in ones and the user's own.

A model factory takes the sequence length and returns ``(model, make_batch)`` or
``(model, make_batch, loss_fn)``: the model on the CPU (the command moves it), a
``make_batch(n)`` giving a micro-batch of ``n`` samples, and optionally
``loss_fn(model, batch)`` giving the scalar loss (else the model's output, or its
``.loss``, is the loss; see :func:`mbfused.plan_micro_batches`).
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn.functional as F

__all__ = ["BUILT_IN", "load"]


class TinyTransformerLM(torch.nn.Module):
    """A small causal transformer language model in plain PyTorch (pre-norm layers)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Embedding(max_len, width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.layers = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = ids.shape[1]
        x = self.embed(ids) + self.position(torch.arange(seq, device=ids.device))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(seq, device=ids.device)
        return self.head(self.norm(self.layers(x, mask=mask, is_causal=True)))


def _token_batches(vocab: int, seq_len: int):
    generator = torch.Generator().manual_seed(0)

    def make_batch(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (n, seq_len), generator=generator)

    return make_batch


def _next_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def transformer(seq_len: int):
    """0.7M parameters: width 128, 2 layers, 4 heads, vocabulary 1024."""
    torch.manual_seed(0)
    vocab = 1024
    model = TinyTransformerLM(vocab, width=128, layers=2, heads=4, max_len=max(seq_len, 1))
    return model, _token_batches(vocab, seq_len), _next_token_loss


def _llama(shape: str, seq_len: int):
    try:
        from transformers import LlamaForCausalLM
    except ImportError as exc:
        raise SystemExit("--model llama-*: needs transformers (pip install transformers)") from exc
    from mbfused.end_to_end import llama_config

    config = llama_config(shape, max(seq_len, 128))
    vocab = config.vocab_size
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    make_ids = _token_batches(vocab, seq_len)

    def make_batch(n: int) -> dict:
        ids = make_ids(n)
        return {"input_ids": ids, "labels": ids}

    return model, make_batch


def llama_tiny(seq_len: int):
    """A Llama of 0.1M parameters (transformers)."""
    return _llama("tiny", seq_len)


def llama_1b(seq_len: int):
    """TinyLlama-1.1B's shape, random weights (transformers); for a GPU, with --dtype bfloat16."""
    return _llama("1b", seq_len)


BUILT_IN = {"transformer": transformer, "llama-tiny": llama_tiny, "llama-1b": llama_1b}


def load(spec: str, seq_len: int):
    """``(model, make_batch, loss_fn or None)`` from a built-in name or ``module:callable``."""
    if spec in BUILT_IN:
        factory = BUILT_IN[spec]
    elif ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"--model {spec}: cannot load {attribute!r} from module "
                             f"{module_name!r}: {exc}") from exc
    else:
        raise SystemExit(f"--model {spec!r}: give one of {', '.join(BUILT_IN)} or module:callable")
    if not callable(factory) or len(inspect.signature(factory).parameters) < 1:
        raise SystemExit(f"--model {spec}: expected a callable taking the sequence length")
    made = factory(seq_len)
    if not isinstance(made, tuple) or len(made) not in (2, 3) or not isinstance(made[0], torch.nn.Module):
        raise SystemExit(f"--model {spec}: the callable must return (model, make_batch) or "
                         f"(model, make_batch, loss_fn), got {type(made).__name__}")
    model, make_batch, loss_fn = (*made, None) if len(made) == 2 else made
    return model, make_batch, loss_fn
