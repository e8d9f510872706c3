"""Uploads are scoped per API key (real gRPC on loopback, keys on): a tensor one key uploaded is not
usable, nor detectable, by another key's digest. A probe of another key's digest fails exactly like a
digest nobody sent, and each key's upload bytes are counted on their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

import farscope
from farscope.interventions import codec, ops
from farscope.interventions.codec import CHUNK_BYTES
from farscope.interventions.graph import IR_VERSION, Graph, Ref, to_document
from farscope.interventions.uploads import digest
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc
from farscope.server.auth import KeyStore
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.service import Server, start_server

MODEL = "tiny"
USERS = ("alice", "bob")


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    saved: list[torch.Tensor]


@dataclass
class Served:
    server: Server
    keys: dict[str, str]
    channel: grpc.Channel

    def execute(self, user: str, body: bytes) -> Outcome:
        """One Execute of an encoded graph as `user`: its status and saved values (OK only)."""
        header = pb.RequestHeader(model=MODEL, client_version="test", ir_version=IR_VERSION, graph_bytes=len(body))
        requests = [pb.ExecuteRequest(header=header),
                    *(pb.ExecuteRequest(graph_chunk=body[i:i + CHUNK_BYTES]) for i in range(0, len(body), CHUNK_BYTES))]
        stub = pb_grpc.FarscopeStub(self.channel)
        blobs: list[bytearray] = []
        try:
            for event in stub.Execute(iter(requests), metadata=(("authorization", f"Bearer {self.keys[user]}"),),
                                      timeout=60):
                if event.WhichOneof("event") == "result":
                    blobs = [bytearray(size) for size in event.result.blob_sizes]
                elif event.WhichOneof("event") == "chunk":
                    chunk = event.chunk
                    blobs[chunk.blob][chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
        except grpc.RpcError as e:
            return Outcome(e.code(), e.details() or "", [])
        saved = codec.decode_results(bytes(blobs[0]), blobs[1:])
        return Outcome(grpc.StatusCode.OK, "", list(saved.values()) if isinstance(saved, dict) else saved)


@pytest.fixture(scope="module")
def served(tiny_spec, tmp_path_factory) -> Iterator[Served]:
    store = KeyStore(tmp_path_factory.mktemp("keys") / "keys.db")
    keys = {user: store.add(user, rate_per_minute=10_000) for user in USERS}
    server = start_server({MODEL: Replica(load_model(tiny_spec("llama", name=MODEL)))}, keys=store)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Served(server, keys, channel)
    finally:
        channel.close()
        server.stop(grace=0)
        store.close()


def _vector(seed: int) -> torch.Tensor:
    return torch.randn(2**16, generator=torch.Generator().manual_seed(seed))  # 256 KiB: kept by digest


def _sum_of(vector: torch.Tensor, *, by_digest: bool) -> bytes:
    """A graph saving `vector.sum()`, the vector sent inline or by digest."""
    graph = Graph(invokes=["hello"])
    graph.add(ops.SAVE, (Ref(graph.add(ops.method_op("sum"), (vector,)).id),))
    key = digest("float32", list(vector.shape), vector.numpy().tobytes())
    return codec.encode(to_document(graph), known={key} if by_digest else set(), sent=set())


def _digest_free(details: str) -> str:
    """An error message with the digest it names blanked out."""
    return re.sub(r"[0-9a-f]{16}", "<digest>", details)


def test_a_key_reuses_its_own_upload_by_digest(served) -> None:
    vector = _vector(1)
    assert served.execute("alice", _sum_of(vector, by_digest=False)).code == grpc.StatusCode.OK
    again = served.execute("alice", _sum_of(vector, by_digest=True))
    assert again.code == grpc.StatusCode.OK, again.details
    assert len(_sum_of(vector, by_digest=True)) < 4096
    assert torch.equal(again.saved[0], vector.sum())


def test_another_keys_upload_is_indistinguishable_from_one_never_sent(served) -> None:
    uploaded, never_sent = _vector(2), _vector(3)
    assert served.execute("alice", _sum_of(uploaded, by_digest=False)).code == grpc.StatusCode.OK
    probe = served.execute("bob", _sum_of(uploaded, by_digest=True))
    control = served.execute("bob", _sum_of(never_sent, by_digest=True))
    assert probe.code == control.code == grpc.StatusCode.FAILED_PRECONDITION, (probe, control)
    assert _digest_free(probe.details) == _digest_free(control.details)
    assert not probe.saved
    # alice still holds it: the probe neither used nor disturbed her copy.
    assert served.execute("alice", _sum_of(uploaded, by_digest=True)).code == grpc.StatusCode.OK


def test_each_key_pays_for_its_own_uploads(served) -> None:
    pool = served.server.engine.uploads
    vector = _vector(4)
    before = {user: pool.nbytes_of(user) for user in USERS}
    served.execute("alice", _sum_of(vector, by_digest=False))
    assert pool.nbytes_of("alice") == before["alice"] + vector.nbytes
    assert pool.nbytes_of("bob") == before["bob"]
    served.execute("bob", _sum_of(vector, by_digest=False))  # bob sends the same tensor: his own copy
    assert pool.nbytes_of("bob") == before["bob"] + vector.nbytes
    assert served.execute("bob", _sum_of(vector, by_digest=True)).code == grpc.StatusCode.OK


def test_the_client_resends_inline_when_its_digest_belongs_to_another_key(served) -> None:
    """The real client, told (wrongly) that the server holds a tensor bob never sent, gets the same
    refusal as for an evicted upload and resends it inline, transparently."""
    vector = _vector(5)
    assert served.execute("alice", _sum_of(vector, by_digest=False)).code == grpc.StatusCode.OK
    bob = farscope.RemoteModel(MODEL, address=f"127.0.0.1:{served.server.port}", api_key=served.keys["bob"])
    try:
        bob._transport.uploaded.add(digest("float32", list(vector.shape), vector.numpy().tobytes()))
        calls: list[int] = []
        original = bob._transport._requests
        bob._transport._requests = lambda model, body, version: (calls.append(sum(len(piece) for piece in body))
                                                                 or original(model, body, version))
        with bob.trace("hello"):
            total = (bob.model.layers[0].output.sum() * 0 + vector).sum().save()  # the vector travels whole
        assert len(calls) == 2 and calls[0] < 4096 < calls[1], calls
        assert torch.allclose(total.value, vector.sum())
    finally:
        bob.close()
