"""Large tensors travel once per server, then by digest; an evicted one is resent transparently."""

from __future__ import annotations

import pytest
import torch

import farscope
from farscope.interventions.uploads import UploadStore, digest
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.service import start_server

PROMPT = "John gave a drink to Mary"


def _steer(model, vec):
    """A probe of `vec.numel() // 64` directions read at layer 0, steering with its top direction."""
    probe = vec.reshape(-1, 64)
    with model.trace(PROMPT):
        h = model.model.layers[0].output
        scores = (h[0, -1] @ probe.T).save()
        h[:, -1] += probe[0]
        logits = model.lm_head.output.save()
    return torch.cat([scores.value, logits.value.flatten()])


def test_a_large_tensor_is_sent_once_then_by_digest(tiny_remote):
    m = tiny_remote["llama"]
    vec = torch.randn(2**18, generator=torch.Generator().manual_seed(1))  # 1 MiB
    first = _steer(m, vec)
    first_bytes = m._transport.last_request_bytes
    second = _steer(m, vec)
    second_bytes = m._transport.last_request_bytes
    assert first_bytes > vec.nbytes
    assert second_bytes < 4096, second_bytes
    assert torch.equal(first, second)
    # A request that edits the server's copy in place does not change it for the next request.
    probe_t = vec.reshape(-1, 64).T  # the same bytes _steer sends, so it goes by digest
    with m.trace(PROMPT):
        h = m.model.layers[0].output
        probe_t.mul_(h[0, -1, :1] * 0).sum().save()  # zeroes the server's copy of the upload
    assert m._transport.last_request_bytes < 4096
    assert torch.equal(_steer(m, vec), first)


def test_small_tensors_always_travel_inline(tiny_remote):
    m = tiny_remote["gpt2"]
    vec = torch.ones(64)
    for _ in range(2):
        with m.trace(PROMPT):
            m.transformer.h[0].output[:, -1] += vec
            m.lm_head.output.save()
        assert m._transport.last_request_bytes > vec.nbytes
    assert not m._transport.uploaded


def test_an_evicted_upload_is_resent_transparently(tiny_spec):
    server = start_server({"tiny": Replica(load_model(tiny_spec("llama", name="tiny")))}, upload_bytes=3 * 2**20)
    try:
        m = farscope.RemoteModel("tiny", address=f"127.0.0.1:{server.port}")
        a = torch.randn(2**19, generator=torch.Generator().manual_seed(2))  # 2 MiB each: one fits
        b = torch.randn(2**19, generator=torch.Generator().manual_seed(3))
        reference = _steer(m, a)
        _steer(m, b)  # evicts a on the server; the client still believes the server holds it
        calls = []
        original = m._transport._requests
        m._transport._requests = lambda model, document, version: (calls.append(len(document))
                                                                   or original(model, document, version))
        again = _steer(m, a)
        assert torch.equal(again, reference)
        assert len(calls) == 2 and calls[0] < 4096 < calls[1]  # by digest, refused, then inline
        m.close()
    finally:
        server.stop(grace=0)


def test_the_store_is_bounded_and_content_addressed():
    store = UploadStore(max_bytes=100)
    t = torch.arange(10, dtype=torch.float32)  # 40 bytes
    key = digest("float32", [10], t.numpy().tobytes())
    store.put(key, t)
    store.put("other", torch.zeros(10))
    store.put("third", torch.zeros(10))  # 120 bytes: the least recently used goes
    assert key not in store and "other" in store and store.nbytes == 80
    with pytest.raises(farscope.UploadMissingError):
        store.get(key)
    copy = store.get("other")
    copy += 1
    assert torch.equal(store.get("other"), torch.zeros(10))
