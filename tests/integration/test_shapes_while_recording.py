"""Shapes while recording, through a real server and client: `x.shape` inside a trace and
`model.scan(...)`, compared with what plain PyTorch gives on a local copy of the same weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from references import at, ids_of, layer

import farscope
from farscope.interventions.errors import TraceError
from farscope.server.inputs import build_batch

PROMPT = "When Mary and John went to the store"
SHORT = "The quick brown fox"
LONGER = "The Eiffel Tower is located in the city of"


def _local_output(model: torch.nn.Module, tokenizer: Any, invokes: list[Any], path: str) -> Any:
    """`path`'s output in a plain forward pass over the batch the server builds for `invokes`."""
    found: list[Any] = []
    handle = at(model, path).register_forward_hook(lambda m, a, out: found.append(out) and None)
    try:
        with torch.no_grad():
            model(**build_batch(model, tokenizer, invokes).inputs)
    finally:
        handle.remove()
    return found[0]


def test_shapes_inside_a_trace_equal_plain_torch(tiny_arch: str, tiny_remote: dict[str, farscope.RemoteModel],
                                                 tiny_local: dict[str, torch.nn.Module], tiny_tokenizer: Any) -> None:
    model, local = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    path = layer(tiny_arch, 1)
    envoy = at(model, path)
    heads = local.config.num_attention_heads
    real = _local_output(local, tiny_tokenizer, [PROMPT], path)
    is_tuple = isinstance(real, tuple)
    real = real[0] if is_tuple else real
    with model.trace(PROMPT):
        hidden = envoy.output[0] if is_tuple else envoy.output
        B, S, H = hidden.shape
        shape = tuple(hidden.shape)
        facts = (hidden.ndim, hidden.dtype, len(hidden), hidden.size(1), hidden.size(), hidden.dim(), hidden.numel())
        per_head = hidden.view(B, S, heads, H // heads).save()
        summed = hidden.sum(-1)
        summed_shape = summed.shape
        logits_shape = model.output.logits.shape
    assert all(type(n) is int for n in (B, S, H))
    assert shape == tuple(real.shape)
    assert facts == (real.ndim, real.dtype, len(real), real.size(1), real.size(), real.dim(), real.numel())
    assert summed_shape == real.sum(-1).shape
    torch.testing.assert_close(per_head, real.view(B, S, heads, H // heads), rtol=0, atol=0)
    assert logits_shape == (1, S, local.config.vocab_size)


def test_each_invoke_sees_its_own_rows(tiny_remote: dict[str, farscope.RemoteModel],
                                       tiny_local: dict[str, torch.nn.Module], tiny_tokenizer: Any) -> None:
    model = tiny_remote["llama"]
    path = layer("llama", 0)
    with model.trace() as tracer:
        with tracer.invoke(LONGER):
            pass
        with tracer.invoke([SHORT, PROMPT]):
            two = at(model, path).output.shape
        with tracer.invoke():
            whole = at(model, path).output.shape
    real = _local_output(tiny_local["llama"], tiny_tokenizer, [LONGER, [SHORT, PROMPT]], path)
    assert two == (2, *real.shape[1:])
    assert whole == real.shape


def test_shapes_read_before_a_longer_invoke_are_refused(tiny_remote: dict[str, farscope.RemoteModel]) -> None:
    model = tiny_remote["llama"]
    with pytest.raises(TraceError, match="padded to"):
        with model.trace() as tracer:
            with tracer.invoke(SHORT):
                at(model, layer("llama", 0)).output.shape  # noqa: B018
            with tracer.invoke(LONGER):
                pass


def test_an_unknown_shape_says_why(tiny_remote: dict[str, farscope.RemoteModel]) -> None:
    model = tiny_remote["llama"]
    with model.trace(PROMPT):
        called = model.lm_head(model.model.norm.output)
        shape = called.shape  # not known here: recorded, the server computes it
        with pytest.raises(TraceError, match="out of order"):
            len(called)
        with pytest.raises(TraceError, match="cannot iterate"):
            B, S, V = shape
        saved = shape.save()
    assert tuple(saved) == (1, len(ids_of(model.tokenizer, PROMPT)[0]), 512)


def test_scan_runs_nothing_and_saves_meta_values(tiny_remote: dict[str, farscope.RemoteModel],
                                                 tiny_local: dict[str, torch.nn.Module],
                                                 tiny_tokenizer: Any) -> None:
    model = tiny_remote["gpt_neox"]
    path = layer("gpt_neox", 1)
    before = model._transport.last_request_bytes
    with model.scan(PROMPT):
        dim = farscope.save(at(model, path).output.shape[-1])
        out = at(model, path).output.save()
        logits = model.output.logits[:, -1].softmax(-1).save()
        called = model.lm_head(out).save()  # out of order: no shape known
    real = _local_output(tiny_local["gpt_neox"], tiny_tokenizer, [PROMPT], path)
    assert dim == real.shape[-1] and type(dim) is int
    assert out.value.device.type == "meta" and out.value.shape == real.shape and out.value.dtype == real.dtype
    assert logits.value.shape == (1, tiny_local["gpt_neox"].config.vocab_size)
    assert "out of order" in (called.missing or "")
    assert model._transport.last_request_bytes == before  # no graph was sent to run


def test_scan_of_the_default_model(smol: farscope.RemoteModel, smol_local: Any) -> None:
    local, tokenizer = smol_local
    with smol.trace("The cat sat on the"):
        attn = smol.model.layers[5].self_attn.output[0]
        B, S, H = attn.shape
        heads = smol.config.num_attention_heads
        probs_shape = smol.model.layers[5].self_attn.attn_probs.output.shape
    real = _local_output(local, tokenizer, ["The cat sat on the"], "model.layers.5.self_attn")[0]
    assert (B, S, H) == tuple(real.shape)
    assert probs_shape == (B, heads, S, S)
