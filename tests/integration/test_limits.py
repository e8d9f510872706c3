"""Costs bounded before they are spent, end to end through a real server and client.

Each refusal checks the error's type and message and that the next ordinary trace is served with the
right values; each accepted boundary case checks its value against plain torch on a local copy of the
same weights. The `limited` server serves tiny-llama with small limits so that boundaries are cheap:
eager attention probabilities of 64 tokens (1 x 4 heads x 64 x 64 float32) are exactly its
max_tensor_bytes, and one pass may take 96 tokens (max_input_tokens).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import farscope
from farscope.interventions import ops
from farscope.server.config import Limits

PROMPT = "John gave a drink to Mary"
PROBS_LIMIT = 1 * 4 * 64 * 64 * 4
MAX_TOKENS = 96


def ids(n: int) -> list[int]:
    return [(7 * i) % 500 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def limited(tiny_spec) -> Iterator[farscope.RemoteModel]:
    from farscope.server.loading import load_model
    from farscope.server.replica import Replica
    from farscope.server.service import start_server

    spec = tiny_spec("llama", limits=Limits(max_tensor_bytes=PROBS_LIMIT, max_input_tokens=MAX_TOKENS))
    server = start_server({spec.name: Replica(load_model(spec))}, host="127.0.0.1", port=0)
    model = farscope.RemoteModel(spec.name, address=f"127.0.0.1:{server.port}")
    try:
        yield model
    finally:
        model.close()
        server.stop(grace=1)


def assert_served(remote: farscope.RemoteModel, local: torch.nn.Module, tokens: list[int] | None = None) -> None:
    """An ordinary trace right after a refusal: served, with the plain forward's logits."""
    tokens = tokens or ids(12)
    with remote.trace(torch.tensor([tokens])):
        logits = remote.lm_head.output.save()
    with torch.no_grad():
        expected = local(torch.tensor([tokens]), use_cache=False).logits
    torch.testing.assert_close(logits.value, expected, rtol=0, atol=0)


# -- plain Python values -------------------------------------------------------------------------------

def test_a_huge_power_of_a_python_int_is_refused_at_once(tiny_remote, tiny_local):
    m = tiny_remote["llama"]
    start = time.monotonic()
    with pytest.raises(farscope.LimitError, match=r"pow would make an int of 60000001 bits, over the limit of "
                                                  r"65536 bits for plain Python ints"):
        with m.trace(PROMPT) as tracer:
            # 64 ** 10**7: once 12.8 s with the GIL held
            (_on_server(tracer, m.model.layers[0].output).shape[-1] ** 10**7).save()
    assert time.monotonic() - start < 5
    assert_served(m, tiny_local["llama"])


@pytest.mark.parametrize(("build", "message"), [
    (lambda h: "x" * (h.shape[-1] * 10**8), r"mul would make a sequence of 6400000000 elements, over the limit of "
                                             r"1048576"),
    (lambda h: h.shape[-1] << 10**6, r"lshift would make an int of 1000007 bits"),
    (lambda h: h.shape * 2**20, r"mul would make a sequence of 3145728 elements"),
])
def test_oversized_python_values_are_refused(tiny_remote, tiny_local, build, message):
    m = tiny_remote["llama"]
    with pytest.raises(farscope.LimitError, match=message):
        with m.trace(PROMPT) as tracer:
            build(_on_server(tracer, m.model.layers[0].output)).save()
    assert_served(m, tiny_local["llama"])


def _on_server(tracer: Any, value: Any) -> Any:
    """`value` whose `.shape` is computed on the server (a recorded getattr): a shape read while
    recording is known on the client, and these checks are of the server's Python-value limits."""
    return SimpleNamespace(shape=tracer.record(ops.GETATTR, (value, "shape")))


def test_nested_python_values_are_counted_whole(tiny_remote, tiny_local, tiny_tokenizer):
    m, local = tiny_remote["llama"], tiny_local["llama"]
    with m.trace(PROMPT):
        rows = m.model.layers[0].output[0, :2].tolist()  # 2 lists of 64 numbers
        accepted = (rows * 3).save()
        at_bound = (rows * 2**13).save()  # 2**14 references to 2 lists: 2**20 numbers, counted whole
    with torch.no_grad():
        h = local(**tiny_tokenizer(PROMPT, return_tensors="pt"), output_hidden_states=True).hidden_states[1]
    assert accepted.value == h[0, :2].tolist() * 3
    assert at_bound.value == h[0, :2].tolist() * 2**13
    with pytest.raises(farscope.LimitError, match=r"holds more than 1048576 elements \(nested sequences counted "
                                                  r"whole\)"):
        with m.trace(PROMPT):
            (m.model.layers[0].output[0, :2].tolist() * (2**13 + 1)).save()  # shallow: 16386 items
    assert_served(m, local)


# -- tensors whose size follows their arguments -----------------------------------------------------------

@pytest.mark.parametrize(("build", "message"), [
    (lambda h: F.pad(h, (0, 10**9)), r"torch.nn.functional.pad would allocate \d+ bytes, over the per-tensor limit"),
    (lambda h: F.one_hot(h[0, :, 0].long().abs(), 10**9), r"one_hot would allocate \d+ bytes"),
    (lambda h: torch.outer(h.flatten().repeat(300), h.flatten().repeat(300)), r"torch.outer would allocate"),
    (lambda h: h[:, -1:].expand(10**8, 1, 64).clone(), r"Tensor.clone would allocate 25600000000 bytes"),
])
def test_oversized_outputs_are_refused_before_they_allocate(tiny_remote, tiny_local, build, message):
    m = tiny_remote["llama"]
    with pytest.raises(farscope.LimitError, match=message):
        with m.trace(PROMPT):
            build(m.model.layers[0].output).save()
    assert_served(m, tiny_local["llama"])


def test_outputs_within_bounds_equal_torch(tiny_remote, tiny_local, tiny_tokenizer):
    m, local = tiny_remote["llama"], tiny_local["llama"]
    with m.trace(PROMPT):
        h = m.model.layers[0].output
        padded = F.pad(h, (1, 2)).save()
        hot = F.one_hot(h[0, :, 0].argmax(-1, keepdim=True), 5).save()
        outer = torch.outer(h[0, -1], h[0, 0]).save()
        huge = h[:, -1:].expand(10**8, 1, 64)  # 25.6 GB as seen; a view holding nothing new
        row = huge[12345].save()
        summed = (huge[:3] * 2).sum(0).save()
    with torch.no_grad():
        x = local(**tiny_tokenizer(PROMPT, return_tensors="pt"), output_hidden_states=True).hidden_states[1]
    assert torch.equal(padded.value, F.pad(x, (1, 2)))
    assert torch.equal(hot.value, F.one_hot(x[0, :, 0].argmax(-1, keepdim=True), 5))
    assert torch.equal(outer.value, torch.outer(x[0, -1], x[0, 0]))
    assert torch.equal(row.value, x[0, -1:])
    assert torch.equal(summed.value, (x[:, -1:].expand(3, 1, 64) * 2).sum(0))


# -- attention probabilities and inputs -------------------------------------------------------------------

def test_attention_probabilities_at_the_limit_equal_eager(limited, tiny_eager):
    tokens = torch.tensor([ids(64)])  # 1 x 4 x 64 x 64 float32: exactly max_tensor_bytes
    with limited.trace(tokens):
        probs = limited.model.layers[0].self_attn.attn_probs.output.save()
    with torch.no_grad():
        expected = tiny_eager["llama"](tokens, use_cache=False, output_attentions=True).attentions[0]
    assert probs.value.nbytes == PROBS_LIMIT
    torch.testing.assert_close(probs.value, expected, rtol=0, atol=0)


def test_attention_probabilities_over_the_limit_are_refused_before_they_allocate(limited, tiny_local):
    with pytest.raises(farscope.LimitError, match=r"reading attn_probs needs eager attention, whose probabilities "
                                                  r"\[batch=1, heads=4, query=65, key=65\] take 67600 bytes, over "
                                                  r"the per-tensor limit of 65536 bytes"):
        with limited.trace(torch.tensor([ids(65)])):
            limited.model.layers[0].self_attn.attn_probs.output.save()
    assert_served(limited, tiny_local["llama"], ids(65))  # the same input without attn_probs: sdpa, served


def test_inputs_over_max_input_tokens_are_refused(limited, tiny_local):
    assert_served(limited, tiny_local["llama"], ids(MAX_TOKENS))  # at the bound
    with pytest.raises(farscope.LimitError, match=r"1 row\(s\) of 97 tokens = 97 tokens in one pass, over this "
                                                  r"model's limit of 96 \(max_input_tokens\)"):
        with limited.trace(torch.tensor([ids(MAX_TOKENS + 1)])):
            limited.lm_head.output.save()
    with pytest.raises(farscope.LimitError, match=r"2 row\(s\) of 50 tokens = 100 tokens"):
        with limited.trace() as tracer:
            for _ in range(2):
                with tracer.invoke(torch.tensor([ids(50)])):
                    limited.lm_head.output.save()
    assert_served(limited, tiny_local["llama"])


def test_inputs_longer_than_the_context_are_refused(tiny_remote, tiny_local):
    m = tiny_remote["llama"]  # max_position_embeddings = 128
    with pytest.raises(farscope.LimitError, match=r"input of invoke 0 has 129 tokens, over the model's context "
                                                  r"length of 128 tokens"):
        with m.trace(torch.tensor([ids(129)])):
            m.lm_head.output.save()
    assert_served(m, tiny_local["llama"], ids(128))
