"""Farscope servers of this folder's own, on loopback, for the hostile-input corpus and the fuzz smoke test.

`target` serves the tiny Llama as "tiny" with the default limits; `small_target` serves it as "small"
with max_request_bytes=4096 and max_nodes=8. Both share `markers`, a folder that hostile payloads
would write into if anything they carry were ever executed: `still_serving()` checks it stays empty.

Not the session's shared `tiny_server` (tests/conftest.py): these servers run under `one_torch_thread`,
and a server's worker thread keeps the intra-op thread count it first computed with, so a shared server
first used here would go on computing with one thread after this folder, and its results would no longer
be bit-identical to the references computed with the default count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fuzz_requests as fz  # this folder is on sys.path (pytest's default "prepend" import mode)
import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from farscope.interventions.graph import IR_VERSION
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc
from farscope.server.config import Limits
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.service import SERVICE_NAME, Server, start_server

SMALL_LIMITS = Limits(max_request_bytes=4096, max_nodes=8)


@dataclass
class Target:
    """One running server, raw gRPC access to it, and what its known request must return."""

    name: str
    server: Server
    channel: grpc.Channel
    stub: pb_grpc.FarscopeStub
    health: health_pb2_grpc.HealthStub
    markers: Path
    baseline: tuple[torch.Tensor, torch.Tensor]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def replica(self) -> Replica:
        return self.server.engine.replicas[self.name]

    def header(self, size: int, *, model: str | None = None, ir_version: int = IR_VERSION,
               client_version: str = "hostile") -> pb.ExecuteRequest:
        return pb.ExecuteRequest(header=pb.RequestHeader(
            model=self.name if model is None else model, client_version=client_version, ir_version=ir_version,
            graph_bytes=size))

    def execute(self, messages: list[pb.ExecuteRequest], *, timeout: float = 60) -> fz.Outcome:
        return fz.call_execute(self.stub, messages, timeout=timeout)

    def still_serving(self) -> None:
        """Health SERVING, no hook left on the model, the known request's exact values, nothing executed."""
        for service in ("", SERVICE_NAME):
            status = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, (service, status)
        leftover = [path for path, module in self.replica.model.named_modules()
                    if module._forward_hooks or module._forward_pre_hooks]
        assert not leftover, f"hooks left on {leftover}"
        outcome = self.execute(fz.messages_for(fz.sentinel_document(), model=self.name))
        assert outcome.code == "OK", (outcome.code, outcome.details)
        for got, want in zip(fz.sentinel_values(outcome.values), self.baseline, strict=True):
            assert torch.equal(got, want)
        assert not list(self.markers.iterdir()), f"a payload executed: {list(self.markers.iterdir())}"


@pytest.fixture(scope="module")
def markers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """A tiny model's matmuls only contend (and spin) with several intra-op threads on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _target(name: str, spec, markers: Path) -> Iterator[Target]:  # noqa: ANN001
    loaded = load_model(spec)
    reference = fz.reference_values(loaded.model, loaded.tokenizer)
    server = start_server({name: Replica(loaded)}, host="127.0.0.1", port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                    options=[("grpc.max_send_message_length", 64 << 20)])
    try:
        stub = pb_grpc.FarscopeStub(channel)
        first = fz.call_execute(stub, fz.messages_for(fz.sentinel_document(), model=name))
        assert first.code == "OK", (first.code, first.details)
        baseline = fz.sentinel_values(first.values)
        for got, want in zip(baseline, reference, strict=True):  # the right values, not only the same ones
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        yield Target(name, server, channel, stub, health_pb2_grpc.HealthStub(channel), markers, baseline)
    finally:
        channel.close()
        server.stop(grace=1)


@pytest.fixture(scope="module")
def target(tiny_spec, markers: Path, one_torch_thread: None) -> Iterator[Target]:
    yield from _target("tiny", tiny_spec("llama", name="tiny"), markers)


@pytest.fixture(scope="module")
def small_target(tiny_spec, markers: Path, one_torch_thread: None) -> Iterator[Target]:
    yield from _target("small", tiny_spec("llama", name="small", limits=SMALL_LIMITS), markers)
