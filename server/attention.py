"""Hook points inside attention: per-head attention probabilities and per-head outputs.

Attention in transformers 5 runs as a function (eager, sdpa, ...) chosen by
`config._attn_implementation`, so its internals have no module to hook. `instrument(model)` gives each
attention module two identity submodules, named like TransformerLens' hook points:

    <attention module>.attn_probs   output: [batch, heads, query, key]   softmax(QK^T) per head
    <attention module>.head_out     output: [batch, query, heads, head_dim]  per-head output, before
                                    the output projection (o_proj / c_proj / dense)

and routes attention through one implementation, "farscope". It delegates to the model's own
implementation (sdpa, unchanged numerics) unless something hooks an `attn_probs`; then every layer
computes eager attention, passing the probabilities through the hook point, so they can be read and
patched, and equal what the model's eager implementation returns as `output_attentions`.
`head_out` always runs (an identity) and can be read or patched per head either way.

Eager attention holds batch x heads x query x key probabilities at once (14 GB for 20,000 tokens): they
are sized before the first matmul and refused over the replica's per-tensor limit (`max_tensor_bytes`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from farscope.interventions.errors import LimitError

__all__ = ["AttentionHookPoint", "instrument", "IMPLEMENTATION"]

log = logging.getLogger(__name__)

IMPLEMENTATION = "farscope"


class AttentionHookPoint(nn.Module):
    """An identity module: a named place in attention to read or patch a value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """An eager (additive) mask from whatever the delegated implementation's mask function made."""
    if mask is not None and mask.dtype != torch.bool:
        return mask[..., : key.shape[-2]]
    if mask is None:  # sdpa leaves plain causal masking to `is_causal`: rebuild it, aligned to the end
        q, k = query.shape[-2], key.shape[-2]
        if q == 1:
            return None
        mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask[..., : key.shape[-2]], zero, torch.finfo(query.dtype).min)


def _check_size(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
    """Refuse eager attention whose probabilities (in float32, as softmax computes them) would exceed
    the limit, before anything of that size is allocated."""
    limit = getattr(module, "_farscope_max_bytes", None)
    batch, heads, queries, keys = query.shape[0], query.shape[1], query.shape[-2], key.shape[-2]
    nbytes = batch * heads * queries * keys * torch.float32.itemsize
    if limit is not None and nbytes > limit:
        raise LimitError(f"reading attn_probs needs eager attention, whose probabilities [batch={batch}, "
                         f"heads={heads}, query={queries}, key={keys}] take {nbytes} bytes, over the per-tensor "
                         f"limit of {limit} bytes (max_tensor_bytes); use a shorter input or fewer invokes")


def _eager(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, scaling: float | None, dropout: float) -> tuple:
    _check_size(module, query, key)
    # The same arithmetic, in the same order, as transformers' eager_attention_forward for Llama,
    # GPT-2 and GPT-NeoX, with the probabilities passed through `attn_probs` before they weight V.
    key = _repeat_kv(key, query.shape[1])
    value = _repeat_kv(value, query.shape[1])
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    mask = _additive_mask(attention_mask, query, key)
    if mask is not None:
        weights = weights + mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    weights = module.attn_probs(weights)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def _make_attention(delegate: str) -> Any:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple:
        # Eager in every layer once any layer's probabilities are hooked: then the whole forward pass
        # is the model's eager one, and the probabilities equal its own `output_attentions`.
        if any(_hooked(p) for p in getattr(module, "_farscope_probs", ())):
            output, weights = _eager(module, query, key, value, attention_mask, scaling, dropout)
        else:
            function = ALL_ATTENTION_FUNCTIONS[delegate]
            output, weights = function(module, query, key, value, attention_mask, scaling=scaling,
                                       dropout=dropout, **kwargs)
        head_out = getattr(module, "head_out", None)
        return (head_out(output) if head_out is not None else output), weights
    return attention


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that call the attention interface: the ones holding q/k/v projections."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("Attention") and not isinstance(module, AttentionHookPoint) and hasattr(module, "config"):
            found.append(module)
    return found


def instrument(model: nn.Module, *, max_bytes: int | None = None) -> int:
    """Add attention hook points to every attention module; returns how many were instrumented.
    `max_bytes`: the most the eager attention probabilities of one layer may take (LimitError past it)."""
    current = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if current.startswith(IMPLEMENTATION):
        modules = _attention_modules(model)
        _set_limit(modules, max_bytes)
        return len(modules)
    if current == "eager" or current not in ALL_ATTENTION_FUNCTIONS:
        log.info("attention hook points need an sdpa-style attention; keeping %r uninstrumented", current)
        return 0
    name = f"{IMPLEMENTATION}-{current}"
    AttentionInterface.register(name, _make_attention(current))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    modules = _attention_modules(model)
    for module in modules:
        module.add_module("attn_probs", AttentionHookPoint())
        module.add_module("head_out", AttentionHookPoint())
    points = tuple(module.attn_probs for module in modules)
    for module in modules:
        # A plain tuple attribute (not submodules): each layer can see whether any layer is hooked.
        object.__setattr__(module, "_farscope_probs", points)
    _set_limit(modules, max_bytes)
    model.config._attn_implementation = name
    return len(modules)


def _set_limit(modules: list[nn.Module], max_bytes: int | None) -> None:
    for module in modules:
        object.__setattr__(module, "_farscope_max_bytes", max_bytes)
