"""Large tensors travel once per server, then by digest; an evicted one is resent transparently."""

from __future__ import annotations

import pytest
import torch

import farscope
from farscope.interventions.uploads import UploadPool, UploadStore, digest
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
        m._transport._requests = lambda model, body, version: (calls.append(sum(len(piece) for piece in body))
                                                               or original(model, body, version))
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


def test_each_user_sees_only_their_own_uploads():
    pool = UploadPool(max_bytes=1000)
    alice, bob = pool.store("alice"), pool.store("bob")
    alice.put("k", torch.ones(10))
    assert "k" in alice and "k" not in bob and len(bob) == 0
    with pytest.raises(farscope.UploadMissingError) as probe:
        bob.get("k")
    with pytest.raises(farscope.UploadMissingError) as never_sent:
        bob.get("k")  # the same digest; now compare with one nobody sent at all
    with pytest.raises(farscope.UploadMissingError) as nobody:
        pool.store("carol").get("k")
    assert str(probe.value) == str(never_sent.value) == str(nobody.value)
    bob.put("k", torch.zeros(10))  # bob's own tensor under the same digest: his copy, not alice's
    assert torch.equal(alice.get("k"), torch.ones(10)) and torch.equal(bob.get("k"), torch.zeros(10))
    assert alice.nbytes == bob.nbytes == 40 and pool.nbytes == 80 and len(pool) == 2


def test_the_pool_bounds_each_user_and_all_users_together():
    pool = UploadPool(max_bytes=200, max_bytes_per_user=100)
    alice, bob = pool.store("alice"), pool.store("bob")
    for key in ("a1", "a2", "a3"):  # 40 bytes each: alice's third evicts her own first, not bob's
        alice.put(key, torch.zeros(10))
    assert "a1" not in alice and "a2" in alice and alice.nbytes == 80
    bob.put("b1", torch.zeros(10))
    bob.put("b2", torch.zeros(10))
    assert pool.nbytes == 160
    alice.get("a2")  # alice's a2 is now the most recently used of all
    pool.store("carol").put("c1", torch.zeros(20))  # 80 more: 240 > 200, the least recently used (a3) goes
    assert pool.nbytes == 200
    assert "a3" not in alice and "a2" in alice and "b1" in bob and "b2" in bob
    assert {user: pool.nbytes_of(user) for user in ("alice", "bob", "carol")} == {"alice": 40, "bob": 80, "carol": 80}
    pool.store("dave").put("too-big", torch.zeros(30))  # 120 bytes: over the per-user bound, never kept
    assert "too-big" not in pool.store("dave") and pool.nbytes_of("dave") == 0
