"""Streams on a real server (loopback, in-process, API keys on): idle and waiting streams hold no server
thread, and a client that leaves while its job is queued leaves the worker serving others.

The streams are opened with a grpc.aio client, so that the test process's own thread count moves only
with the server's. A "gate" (a forward pre-hook on the slow model) holds one job running for as long
as the test needs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import farscope
from farscope.interventions import codec
from farscope.interventions.codec import CHUNK_BYTES
from farscope.interventions.errors import CancelledError
from farscope.interventions.graph import IR_VERSION, Graph, HookPoint, Ref, to_document
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc
from farscope.server.auth import KeyStore
from farscope.server.engine import StreamLimits
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.service import SERVICE_NAME, Server, start_server

SLOW, FAST = "slow", "fast"
PROMPT = "The quick brown fox"
STREAMS = 200
WAIT = 60.0
USERS = ("alice", "bob", "carol", "dave")


class Gate:
    """Forward pre-hook: while closed, a forward pass waits at the model's entrance (at most WAIT s)."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.waiting = threading.Event()

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.waiting.set()
        self._open.wait(WAIT)

    def close(self) -> None:
        self.waiting.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()


@dataclass
class Served:
    server: Server
    gate: Gate
    keys: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def model(self, name: str, user: str) -> farscope.RemoteModel:
        return farscope.RemoteModel(name, address=self.address, api_key=self.keys[user], timeout=WAIT)

    def metadata(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[user]}"),)

    def requests_seen(self, rpc: str) -> float:
        registry = self.server.engine.metrics.registry
        return registry.get_sample_value("farscope_requests_total", {"rpc": rpc}) or 0.0


@pytest.fixture(scope="module")
def served(tiny_spec, tmp_path_factory) -> Iterator[Served]:
    store = KeyStore(tmp_path_factory.mktemp("keys") / "keys.db")
    keys = {user: store.add(user, rate_per_minute=10_000, max_concurrent=10) for user in USERS}
    slow = Replica(load_model(tiny_spec("llama", name=SLOW)))
    fast = Replica(load_model(tiny_spec("llama", name=FAST)))
    gate = Gate()
    handle = slow.model.register_forward_pre_hook(gate)
    # Caps well above STREAMS (the clients add streams of their own): this module measures what many
    # open streams cost; the caps themselves are tested in test_stream_limits.py.
    limits = StreamLimits(max_execute_streams=2 * STREAMS, max_watch_streams=2 * STREAMS,
                          max_unauthenticated=2 * STREAMS)
    server = start_server({SLOW: slow, FAST: fast}, host="127.0.0.1", port=0, keys=store, stream_limits=limits)
    try:
        yield Served(server, gate, keys)
    finally:
        gate.open()
        server.stop(grace=1)
        handle.remove()
        store.close()


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _read(model: farscope.RemoteModel) -> torch.Tensor:
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    return logits.value


def _long_job(served: Served) -> str:
    """A job of alice's on the slow model, running and held at the gate; its id."""
    served.gate.close()
    model = served.model(SLOW, "alice")
    with model.trace(PROMPT, blocking=False) as tracer:
        model.lm_head.output.save()
    assert served.gate.waiting.wait(WAIT), "the long job never started"
    return tracer.job.id


def _requests(model: str) -> list[pb.ExecuteRequest]:
    graph = Graph(invokes=[PROMPT])
    graph.add("save", (Ref(graph.add("read", (HookPoint("lm_head", "output"),), {"invoke": 0}).id),))
    body = codec.encode(to_document(graph))
    header = pb.RequestHeader(model=model, client_version="test", ir_version=IR_VERSION, graph_bytes=len(body))
    return [pb.ExecuteRequest(header=header), *(pb.ExecuteRequest(graph_chunk=body[i:i + CHUNK_BYTES])
                                                for i in range(0, len(body), CHUNK_BYTES))]


def test_idle_and_waiting_streams_hold_no_server_threads(served):
    fast = served.model(FAST, "bob")
    baseline = _read(fast)  # warms the client's channel and the server's decode pool
    job_id = _long_job(served)
    executes_before = served.requests_seen("Execute")
    threads_before = threading.active_count()

    async def scenario() -> tuple[int, float, float, torch.Tensor]:
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = pb_grpc.FarscopeStub(channel)
            # Clients that open Execute and never send a header, and clients watching the long job.
            idle = [stub.Execute(metadata=served.metadata("carol")) for _ in range(STREAMS)]
            watches = [stub.Watch(pb.JobRequest(job_id=job_id), metadata=served.metadata("alice"))
                       for _ in range(STREAMS)]
            try:
                for watch in watches:  # each stream is open on the server: it replayed the job's events
                    assert (await watch.read()).WhichOneof("event") == "queued"
                    assert (await watch.read()).WhichOneof("event") == "running"
                deadline = time.monotonic() + WAIT
                while served.requests_seen("Execute") < executes_before + STREAMS:
                    assert time.monotonic() < deadline, "the idle Execute streams never reached the server"
                    await asyncio.sleep(0.01)
                threads_during = threading.active_count()
                # Meanwhile another user's trace is served in normal time, and health answers.
                started = time.monotonic()
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
                health_seconds = time.monotonic() - started
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                started = time.monotonic()
                logits = await asyncio.to_thread(_read, fast)
                trace_seconds = time.monotonic() - started
            finally:
                for call in [*idle, *watches]:
                    call.cancel()
        return threads_during, health_seconds, trace_seconds, logits

    try:
        threads_during, health_seconds, trace_seconds, logits = asyncio.run(asyncio.wait_for(scenario(), 4 * WAIT))
    finally:
        served.gate.open()
    assert threads_during - threads_before < 20, (threads_before, threads_during)
    assert health_seconds < 2.0
    assert trace_seconds < 5.0
    assert torch.equal(logits, baseline)
    job = served.server.engine.jobs.get(job_id)
    assert job.wait(WAIT) and job.error is None  # the watched job itself was never disturbed


def test_a_client_leaving_while_its_job_is_queued_leaves_the_worker_serving(served):
    # Issue 9, item 1: a client gone while its job waited once killed the worker for every user.
    long_id = _long_job(served)

    async def leave() -> str:
        async with grpc.aio.insecure_channel(served.address) as channel:
            call = pb_grpc.FarscopeStub(channel).Execute(iter(_requests(SLOW)), metadata=served.metadata("bob"))
            first = await call.read()
            assert first.WhichOneof("event") == "queued"
            call.cancel()
            return first.queued.job_id

    try:
        left_id = asyncio.run(asyncio.wait_for(leave(), WAIT))
        engine = served.server.engine
        _until(lambda: engine.jobs.get(left_id).finished is not None, "the abandoned job to be cancelled")
        assert isinstance(engine.jobs.get(left_id).error, CancelledError)
    finally:
        served.gate.open()
    started = time.monotonic()
    assert _read(served.model(SLOW, "dave")).shape[0] == 1  # the next user is served
    assert time.monotonic() - started < 10.0
    long_job = served.server.engine.jobs.get(long_id)
    assert long_job.wait(WAIT) and long_job.error is None
