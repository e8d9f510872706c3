"""Stream hygiene on a real server (loopback): no client holds a call open for free.

- A request must arrive in time: its header, and each chunk after it, within `message_seconds`, the
  whole body within `request_seconds`; else DEADLINE_EXCEEDED (a LimitError) and the call is closed.
- A key has at most `max_execute_streams` Execute/Submit and `max_watch_streams` Watch calls open;
  all users together at most `max_unauthenticated` calls waiting for their keys to be checked. Over a
  cap: RESOURCE_EXHAUSTED, while other keys and the health check are served as usual.
- The rate token is taken before the first message is read: calls that send nothing still pay.

Streams are opened with a grpc.aio client, so the test holds them open without threads of its own.
"""

from __future__ import annotations

import asyncio
import re
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
from farscope.interventions.graph import IR_VERSION, Graph, HookPoint, Ref, to_document
from farscope.interventions.ops import READ, SAVE
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc
from farscope.server.auth import KeyStore
from farscope.server.engine import StreamLimits
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.service import SERVICE_NAME, Server, start_server

MODEL = "tiny"
PROMPT = "The quick brown fox"
WAIT = 30.0
PACED = StreamLimits(message_seconds=1.0, request_seconds=3.0)
CAPPED = StreamLimits(max_execute_streams=3, max_watch_streams=2, max_unauthenticated=3)


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
    keys: dict[str, str]
    gate: Gate

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def metadata(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[user]}"),) if user in self.keys else ()

    def model(self, user: str) -> farscope.RemoteModel:
        return farscope.RemoteModel(MODEL, address=self.address, api_key=self.keys.get(user), timeout=WAIT)

    def open_streams(self, kind: str, user: str) -> int:
        return self.server.engine.streams.count((kind, user))


def _serve(tiny_spec, limits: StreamLimits, keys: KeyStore | None, users: dict[str, int]) -> Iterator[Served]:
    replica = Replica(load_model(tiny_spec("llama", name=MODEL)))
    gate = Gate()
    handle = replica.model.register_forward_pre_hook(gate)
    # One concurrent job per key: a key's stream caps are never below its job quota.
    issued = ({user: keys.add(user, rate_per_minute=rate, max_concurrent=1) for user, rate in users.items()}
              if keys else {})
    server = start_server({MODEL: replica}, keys=keys, stream_limits=limits, blocking_threads=1)
    try:
        yield Served(server, issued, gate)
    finally:
        gate.open()
        server.stop(grace=0)
        handle.remove()


@pytest.fixture(scope="module")
def paced(tiny_spec) -> Iterator[Served]:
    """Keys off, short receive deadlines."""
    yield from _serve(tiny_spec, PACED, None, {})


@pytest.fixture(scope="module")
def capped(tiny_spec, tmp_path_factory) -> Iterator[Served]:
    """Keys on, small caps; `thrifty` may make 2 calls a minute."""
    with KeyStore(tmp_path_factory.mktemp("keys") / "keys.db") as keys:
        yield from _serve(tiny_spec, CAPPED, keys, {"alice": 10_000, "bob": 10_000, "thrifty": 2})


def _body() -> bytes:
    graph = Graph(invokes=[PROMPT])
    graph.add(SAVE, (Ref(graph.add(READ, (HookPoint("lm_head", "output"),), {"invoke": 0}).id),))
    return codec.encode(to_document(graph))


def _header(graph_bytes: int) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(header=pb.RequestHeader(model=MODEL, client_version="test", ir_version=IR_VERSION,
                                                     graph_bytes=graph_bytes))


def _requests() -> list[pb.ExecuteRequest]:
    body = _body()
    return [_header(len(body)), *(pb.ExecuteRequest(graph_chunk=body[i:i + CHUNK_BYTES])
                                  for i in range(0, len(body), CHUNK_BYTES))]


def _run(scenario: Callable[[grpc.aio.Channel], object], served: Served) -> object:
    async def main() -> object:
        async with grpc.aio.insecure_channel(served.address) as channel:
            return await scenario(channel)

    return asyncio.run(asyncio.wait_for(main(), 4 * WAIT))


async def _error_of(call: object) -> grpc.aio.AioRpcError:
    """The error a call ends with (reading it to the end)."""
    try:
        if hasattr(call, "read"):
            while await call.read() is not grpc.aio.EOF:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded")


async def _served_health(channel: grpc.aio.Channel) -> float:
    """Seconds the health check took; asserts SERVING."""
    started = time.monotonic()
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                            timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - started


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def _sync_error(served: Served, call: Callable[[pb_grpc.FarscopeStub], object]) -> grpc.RpcError:
    """The error of one call made with a synchronous stub, as the farscope client makes it. (An aio
    client whose request stream the server ends before reading reports its failed write as INTERNAL
    instead of the server's status.)"""
    with grpc.insecure_channel(served.address) as channel:
        try:
            result = call(pb_grpc.FarscopeStub(channel))
            for _ in result if hasattr(result, "__iter__") else ():
                pass
        except grpc.RpcError as error:
            return error
    raise AssertionError("the call succeeded")


def _farscope_error(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata() or ()).get("farscope-error", "")


def _read_logits(model: farscope.RemoteModel) -> torch.Tensor:
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    return logits.value


# -- receive deadlines ----------------------------------------------------------------------------


def test_a_call_that_sends_nothing_is_cut_off(paced) -> None:
    async def scenario(channel: grpc.aio.Channel) -> tuple[grpc.aio.AioRpcError, float]:
        started = time.monotonic()
        error = await _error_of(pb_grpc.FarscopeStub(channel).Execute())
        return error, time.monotonic() - started

    error, seconds = _run(scenario, paced)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert _farscope_error(error) == "LimitError"
    assert "no RequestHeader arrived within 1 s" in error.details()
    assert PACED.message_seconds * 0.9 <= seconds < PACED.message_seconds + 5
    deadline = time.monotonic() + WAIT
    while paced.open_streams("execute", "") != 0:  # its slot is freed as the call ends
        assert time.monotonic() < deadline, "the cut-off call kept its slot"
        time.sleep(0.005)


def test_a_body_that_stalls_is_cut_off(paced) -> None:
    async def scenario(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
        call = pb_grpc.FarscopeStub(channel).Execute()
        await call.write(_header(100))
        await call.write(pb.ExecuteRequest(graph_chunk=b"x" * 10))
        return await _error_of(call)

    error = _run(scenario, paced)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert "no graph chunk arrived within 1 s" in error.details()


def test_a_trickling_body_is_cut_off_by_the_request_deadline(paced) -> None:
    async def scenario(channel: grpc.aio.Channel) -> tuple[grpc.aio.AioRpcError, float]:
        call = pb_grpc.FarscopeStub(channel).Execute()
        started = time.monotonic()

        async def trickle() -> None:  # one byte every 0.3 s: each in time, the whole never
            await call.write(_header(1000))
            for _ in range(1000):
                await asyncio.sleep(0.3)
                await call.write(pb.ExecuteRequest(graph_chunk=b"x"))

        writer = asyncio.ensure_future(trickle())
        try:
            error = await _error_of(call)
        finally:
            writer.cancel()
        return error, time.monotonic() - started

    error, seconds = _run(scenario, paced)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert "the request did not arrive within 3 s" in error.details()
    assert PACED.request_seconds * 0.9 <= seconds < PACED.request_seconds + 5


def test_ordinary_requests_arrive_well_within_the_deadlines(paced) -> None:
    with paced.model("") as model:
        assert torch.isfinite(_read_logits(model)).all()


# -- caps on open streams -------------------------------------------------------------------------


def test_a_key_over_its_execute_streams_is_refused_while_others_are_served(capped) -> None:
    with capped.model("bob") as bob:
        baseline = _read_logits(bob)

        async def scenario(channel: grpc.aio.Channel) -> tuple[grpc.aio.AioRpcError, float, torch.Tensor]:
            stub = pb_grpc.FarscopeStub(channel)
            idle = [stub.Execute(metadata=capped.metadata("alice")) for _ in range(CAPPED.max_execute_streams)]
            try:
                await _until(lambda: capped.open_streams("execute", "alice") == CAPPED.max_execute_streams,
                             "alice's idle streams to open")
                refused = await asyncio.to_thread(_sync_error, capped, lambda stub: stub.Execute(
                    iter(_requests()), metadata=capped.metadata("alice"), timeout=WAIT))
                health_seconds = await _served_health(channel)
                logits = await asyncio.to_thread(_read_logits, bob)
            finally:
                for call in idle:
                    call.cancel()
            await _until(lambda: capped.open_streams("execute", "alice") == 0, "alice's streams to close")
            return refused, health_seconds, logits

        refused, health_seconds, logits = _run(scenario, capped)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
    assert _farscope_error(refused) == "LimitError"
    assert "API key 'alice' has 3 Execute/Submit calls open already" in refused.details()
    assert "retry-after" in dict(refused.trailing_metadata())
    assert health_seconds < 2.0
    assert torch.equal(logits, baseline)
    with capped.model("alice") as alice:  # once her streams closed, alice is served again
        assert torch.equal(_read_logits(alice), baseline)


def test_a_key_over_its_watch_streams_is_refused(capped) -> None:
    async def scenario(channel: grpc.aio.Channel) -> tuple[grpc.aio.AioRpcError, str]:
        stub = pb_grpc.FarscopeStub(channel)
        capped.gate.close()
        try:
            job_id = (await stub.Submit(iter(_requests()), metadata=capped.metadata("alice"), timeout=WAIT)).job_id
            watches = [stub.Watch(pb.JobRequest(job_id=job_id), metadata=capped.metadata("alice"))
                       for _ in range(CAPPED.max_watch_streams)]
            for watch in watches:  # each is open on the server: it replayed the job's first event
                assert (await watch.read()).WhichOneof("event") == "queued"
            refused = await _error_of(stub.Watch(pb.JobRequest(job_id=job_id), metadata=capped.metadata("alice")))
            watches[0].cancel()
            await _until(lambda: capped.open_streams("watch", "alice") < CAPPED.max_watch_streams, "a slot")
            again = stub.Watch(pb.JobRequest(job_id=job_id), metadata=capped.metadata("alice"))
            first = (await again.read()).WhichOneof("event")
        finally:
            capped.gate.open()
        for watch in [*watches[1:], again]:
            while await watch.read() is not grpc.aio.EOF:
                pass
        return refused, first

    refused, first = _run(scenario, capped)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
    assert "API key 'alice' has 2 Watch calls open already" in refused.details()
    assert first == "queued"


def test_calls_waiting_for_their_key_check_are_capped_for_everyone(capped) -> None:
    """The key-check pool (one thread here) is held busy: calls queue for it, up to the cap."""
    release = threading.Event()
    busy = capped.server._blocking.submit(release.wait, WAIT)

    async def scenario(channel: grpc.aio.Channel) -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError, float, int]:
        stub = pb_grpc.FarscopeStub(channel)
        try:
            waiting = [stub.ListModels(pb.ListModelsRequest(), metadata=capped.metadata(user), timeout=WAIT)
                       for user in ("alice", "bob", "alice")]
            await _until(lambda: capped.server.engine.streams.count(("unauthenticated",)) == 3, "3 calls waiting")
            refused = await _error_of(stub.ListModels(pb.ListModelsRequest(), metadata=capped.metadata("bob")))
            started = time.monotonic()
            no_key = await asyncio.to_thread(_sync_error, capped,  # refused at once, without the pool
                                             lambda stub: stub.Execute(iter(_requests()), timeout=WAIT))
            no_key_seconds = time.monotonic() - started
            assert await _served_health(channel) < 2.0
        finally:
            release.set()
        answered = [len((await call).models) for call in waiting]
        return refused, no_key, no_key_seconds, min(answered)

    try:
        refused, no_key, no_key_seconds, models = _run(scenario, capped)
    finally:
        release.set()
        busy.result(WAIT)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
    assert "busy checking 3 other calls' keys" in refused.details()
    assert no_key.code() == grpc.StatusCode.UNAUTHENTICATED and no_key_seconds < 2.0
    assert models == 1  # the waiting calls were served once the pool was free
    assert capped.server.engine.streams.count(("unauthenticated",)) == 0


def test_the_rate_is_charged_before_anything_is_read(capped) -> None:
    """`thrifty` may make 2 calls a minute: two calls that send nothing spend them both."""
    async def scenario(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
        stub = pb_grpc.FarscopeStub(channel)
        idle = [stub.Execute(metadata=capped.metadata("thrifty")) for _ in range(2)]
        await _until(lambda: capped.open_streams("execute", "thrifty") == 2, "the idle calls to open")
        await asyncio.sleep(0.1)
        for call in idle:
            call.cancel()
        await _until(lambda: capped.open_streams("execute", "thrifty") == 0, "the idle calls to close")
        return await asyncio.to_thread(_sync_error, capped, lambda stub: stub.Execute(
            iter(_requests()), metadata=capped.metadata("thrifty"), timeout=WAIT))

    refused = _run(scenario, capped)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
    assert "rate limit exceeded for 'thrifty'" in refused.details()


def test_a_keys_caps_are_never_below_its_job_quota() -> None:
    """A client watches each of its non-blocking jobs: a key allowed 5 jobs may watch 5 at once."""
    from contextlib import ExitStack

    from farscope.interventions.errors import LimitError
    from farscope.server.auth import User
    from farscope.server.engine import Engine

    engine = Engine(stream_limits=StreamLimits(max_execute_streams=2, max_watch_streams=2))
    for user, cap in ((User("big", max_concurrent=5), 5), (User("small", max_concurrent=1), 2), (None, 2)):
        for kind in ("execute", "watch"):
            with ExitStack() as held:
                for _ in range(cap):
                    held.enter_context(engine.stream(user, kind))
                with pytest.raises(LimitError, match=f"has {cap} "):
                    held.enter_context(engine.stream(user, kind))
            assert engine.streams.count((kind, user.name if user else "")) == 0


def test_stream_limits_must_be_positive() -> None:
    for field in ("max_execute_streams", "max_watch_streams", "max_unauthenticated", "message_seconds",
                  "request_seconds"):
        for bad in (0, -1, True):
            with pytest.raises(ValueError, match=field):
                StreamLimits(**{field: bad})


def test_the_cli_states_the_engines_defaults(capsys) -> None:
    from farscope.server.cli import main
    from farscope.server.engine import DEFAULT_UPLOAD_BYTES

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = StreamLimits()
    for flag, value in (("--max-execute-streams", defaults.max_execute_streams),
                        ("--max-watch-streams", defaults.max_watch_streams),
                        ("--max-unauthenticated", defaults.max_unauthenticated),
                        ("--message-seconds", defaults.message_seconds),
                        ("--request-seconds", defaults.request_seconds),
                        ("--upload-bytes", DEFAULT_UPLOAD_BYTES)):
        help_text = text.split(f"{flag} ")[-1].split(" --", 1)[0]  # its entry, after the usage line
        shown = str(value) if isinstance(value, int) else f"{value:g}"
        assert re.search(rf"\(default {shown}[;:)]", help_text), (flag, help_text)
