"""A result of more than 1 GiB arrives whole, streamed in chunks far below gRPC's 4 MiB message cap."""

from __future__ import annotations

import math

import pytest
import torch

from farscope.proto import farscope_pb2 as pb


@pytest.mark.slow
def test_a_1gib_result_arrives_whole_in_chunks(tiny_remote, tiny_local, tiny_tokenizer, monkeypatch):
    m = tiny_remote["llama"]
    prompt = "When Mary and John went to the store"
    with m.trace(prompt):
        logits = m.lm_head.output.save()
    per_copy = logits.value.numel() * 4
    copies = math.ceil(2**30 / per_copy)

    largest = []
    original = m._transport.execute

    def watch(model, document, **kwargs):
        def on_event(event: pb.ExecuteEvent) -> None:
            largest.append(event.ByteSize())
        return original(model, document, on_event=on_event, **kwargs)
    monkeypatch.setattr(m._transport, "execute", watch)

    with m.trace(prompt):
        big = m.lm_head.output.repeat(copies, 1, 1).save()
    assert big.value.nbytes >= 2**30
    assert big.shape == (copies, *logits.value.shape[1:])
    for i in (0, copies // 2, copies - 1):
        assert torch.equal(big.value[i], logits.value[0])
    assert max(largest) < 4 * 2**20  # every message under gRPC's default cap
    assert len(largest) > 256
