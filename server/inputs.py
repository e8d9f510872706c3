"""Turning each invoke's input (text or token ids) into one left-padded batch."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from farscope.interventions.errors import LimitError, ValidationError

from .executor import Batch

__all__ = ["build_batch", "context_length", "rows_of"]

# Where configs state the positions a model was built for (Llama & co, GPT-2, older GPT-2 style).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def context_length(model: nn.Module) -> int | None:
    """The most tokens one row may hold: the model's positions, as its config states them."""
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_lengths(model: nn.Module, sequences: list[list[int]], rows: list[tuple[int, int]],
                   max_tokens: int | None) -> None:
    """Refuse, before any forward pass, a row longer than the model's context or a pass over
    `max_tokens` tokens (rows x padded length: what the pass computes on)."""
    if not sequences:
        return
    context = context_length(model)
    if context is not None:
        for index, (start, stop) in enumerate(rows):
            longest = max(len(s) for s in sequences[start:stop])
            if longest > context:
                raise LimitError(f"input of invoke {index} has {longest} tokens, over the model's context length "
                                 f"of {context} tokens")
    tokens = len(sequences) * max(len(s) for s in sequences)
    if max_tokens is not None and tokens > max_tokens:
        raise LimitError(f"the inputs make {len(sequences)} row(s) of {tokens // len(sequences)} tokens = {tokens} "
                         f"tokens in one pass, over this model's limit of {max_tokens} (max_input_tokens)")


def rows_of(tokenizer: Any, value: Any) -> list[list[int]]:
    """The token ids of each row an invoke's input makes."""
    if isinstance(value, str):
        return [tokenizer(value)["input_ids"]]
    if isinstance(value, torch.Tensor):
        return [value.tolist()] if value.dim() == 1 else value.tolist()
    if isinstance(value, list) and value and isinstance(value[0], str):
        return [tokenizer(v)["input_ids"] for v in value]
    if isinstance(value, list) and value and isinstance(value[0], int):
        return [list(value)]
    return [list(v) for v in value]


def build_batch(model: nn.Module, tokenizer: Any, invokes: list[Any], mode: str = "trace", *,
                max_tokens: int | None = None) -> Batch:
    """Tokenize every invoke, left-pad to one length, and record which rows each invoke owns.

    Left padding keeps every prompt's last token at position -1, as NNsight does. With padding, the
    attention mask hides the pads and explicit position ids start each row at 0, so a padded row
    computes what it would alone. Without padding only `input_ids` is passed: exactly a plain call.
    Under generate, `generate` gets the attention mask (it derives position ids itself) and the pad id.
    Rows longer than the model's context, or more than `max_tokens` tokens in all, are refused.
    """
    rows: list[tuple[int, int]] = []
    sequences: list[list[int]] = []
    vocab = model.get_input_embeddings().num_embeddings
    for index, value in enumerate(invokes):
        seqs = rows_of(tokenizer, value)
        for seq in seqs:
            if not seq:
                raise ValidationError(f"input of invoke {index} is empty")
            if min(seq) < 0 or max(seq) >= vocab:
                raise ValidationError(f"input of invoke {index} has token ids outside [0, {vocab})")
        rows.append((len(sequences), len(sequences) + len(seqs)))
        sequences.extend(seqs)
    _check_lengths(model, sequences, rows, max_tokens)
    length = max(len(s) for s in sequences)
    device = model.get_input_embeddings().weight.device
    accepted = inspect.signature(model.forward).parameters
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (length - len(s)) + s for s in sequences], device=device)
    mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences], device=device)
    if mode == "generate":
        return Batch({"input_ids": ids, "attention_mask": mask, "pad_token_id": pad}, rows)
    # A trace is one forward pass: building a KV cache would only cost memory (and its cache object
    # would show up in every layer's kwargs).
    extra = {"use_cache": False} if "use_cache" in accepted else {}
    if all(len(s) == length for s in sequences):
        return Batch({"input_ids": ids, **extra}, rows)
    inputs = {"input_ids": ids, "attention_mask": mask, **extra}
    if "position_ids" in accepted:
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(inputs, rows)
