"""Saved views of any layout come back through a real server as exactly their values.

A saved value is often a view: a column, a transposed slice, an expanded row, the probability of one
token (`softmax(logits[:, -1])[:, token]`, a one-element view whose stride is the vocabulary size).
Each is compared exactly with the same expression in plain PyTorch on a local copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from references import at, ids_of, layer

from farscope.interventions.errors import RemoteError

PROMPT = "When Mary and John went to the store"  # 9 tokens: one prompt, so no padding
TOKEN_ID = 17

# name -> fn(mlp output of layer 1, logits): the same expression on proxies and on tensors.
SAVED_VIEWS: dict[str, Callable[[Any, Any], Any]] = {
    "token-probability": lambda mlp, logits: torch.softmax(logits[:, -1], -1)[:, TOKEN_ID],
    "token-logit": lambda mlp, logits: logits[:, -1, TOKEN_ID],
    "last-position-probabilities": lambda mlp, logits: torch.softmax(logits[:, -1], -1),
    "transposed-slice": lambda mlp, logits: logits[0, 2:6].t(),
    "column": lambda mlp, logits: mlp[0, :, 3],
    "expanded-row": lambda mlp, logits: mlp[:, -1:].expand(3, 4, -1),
    "stepped-and-flipped": lambda mlp, logits: logits[0, ::2, ::3].flip(0),
    "permuted": lambda mlp, logits: mlp.permute(2, 0, 1),
    "diagonal": lambda mlp, logits: logits[0, :, :9].diagonal(),
    "one-element-slice": lambda mlp, logits: mlp[:, -1, 5:6],
}


def reference(model: torch.nn.Module, ids: torch.Tensor, mlp_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp output, logits) of a plain forward pass, as the server runs a trace."""
    reads: dict[str, torch.Tensor] = {}
    module = dict(model.named_modules())[mlp_path]
    handle = module.register_forward_hook(lambda m, a, out: reads.__setitem__("mlp", out.clone()))
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
    finally:
        handle.remove()
    return reads["mlp"], logits


def test_saved_views_of_every_layout_equal_plain_pytorch(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    mlp_path = f"{layer(tiny_arch, 1)}.mlp"
    with m.trace(PROMPT):
        mlp, logits = at(m, mlp_path).output, m.lm_head.output
        saved = {name: view(mlp, logits).save() for name, view in SAVED_VIEWS.items()}
    ref_mlp, ref_logits = reference(model, ids_of(tiny_tokenizer, PROMPT), mlp_path)
    for name, view in SAVED_VIEWS.items():
        expected = view(ref_mlp, ref_logits)
        got = saved[name].value
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda msg, name=name: f"{name}: {msg}")


def test_the_token_probability_is_a_one_element_view_with_the_vocabulary_as_stride(tiny_local, tiny_tokenizer):
    # The layout that once failed on the server ("self.stride(-1) must be 1 to view Float as Byte").
    _, logits = reference(tiny_local["llama"], ids_of(tiny_tokenizer, PROMPT), f"{layer('llama', 1)}.mlp")
    probability = SAVED_VIEWS["token-probability"](None, logits)
    assert probability.shape == (1,) and probability.stride() == (logits.shape[-1],)


def test_a_saved_meta_tensor_fails_naming_the_users_line(tiny_remote):
    m = tiny_remote["llama"]
    with pytest.raises(RemoteError, match="meta device") as caught:
        with m.trace(PROMPT):
            m.lm_head.output.to("meta").save()
    where = caught.value.where or ""
    assert "test_saved_layouts.py:" in where and '.to("meta").save()' in where, where


def test_a_meta_tensor_in_a_request_is_refused_by_the_client_by_name(tiny_remote):
    # The wire carries no device: a tensor without values cannot even be written into a request.
    m = tiny_remote["llama"]
    with pytest.raises(TypeError, match=r"meta device \(shape \[512\]"):
        with m.trace(PROMPT):
            (m.lm_head.output + torch.empty(512, device="meta")).save()
