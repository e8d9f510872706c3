"""Helpers shared by the integration tests: module paths of the tiny architectures, token ids, and
plain-PyTorch bookkeeping (hook counters) used to compute references."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


def at(root: Any, path: str) -> Any:
    """The envoy (or local module) at a dotted `named_modules()` path."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def layer(arch: str, i: int) -> str:
    return f"{LAYERS[arch]}.{i}"


def ids_of(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


@contextlib.contextmanager
def count_calls(model: torch.nn.Module, paths: Any) -> Iterator[dict[str, int]]:
    """Counts forward calls of `model`'s modules at `paths` (forward hooks, removed afterwards)."""
    modules = dict(model.named_modules())
    counts = dict.fromkeys(paths, 0)
    handles = [modules[p].register_forward_hook(lambda m, a, o, p=p: counts.__setitem__(p, counts[p] + 1))
               for p in paths]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
