"""The engine called directly, without gRPC: a graph built with farscope.interventions, submitted,
run on a tiny model, its results decoded and compared with plain PyTorch; and the checks a request
passes before it runs."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from farscope.interventions import codec
from farscope.interventions.errors import (
    CancelledError,
    LimitError,
    ModelNotFoundError,
    PermissionDeniedError,
    TransportError,
    ValidationError,
    VersionError,
)
from farscope.interventions.graph import IR_VERSION, Graph, HookPoint, Ref, to_document
from farscope.server.auth import User
from farscope.server.engine import Engine, Header
from farscope.server.loading import load_model
from farscope.server.replica import Replica

MODEL = "tiny"
PROMPT = "The quick brown fox"
WAIT = 60.0


@pytest.fixture(scope="module")
def replica(tiny_spec) -> Replica:
    return Replica(load_model(tiny_spec("llama", name=MODEL)))


@pytest.fixture
def engine(replica: Replica) -> Iterator[Engine]:
    engine = Engine({MODEL: replica})
    yield engine
    engine.close(grace=5)


def _logits_request() -> bytes:
    graph = Graph(invokes=[PROMPT])
    read = graph.add("read", (HookPoint("lm_head", "output"),), {"invoke": 0}, where="test_engine.py:1")
    graph.add("save", (Ref(read.id),), where="test_engine.py:1")
    return codec.encode(to_document(graph))


def _header(body: bytes, **changes: object) -> Header:
    fields = {"model": MODEL, "ir_version": IR_VERSION, "graph_bytes": len(body), "client_version": "test"}
    fields.update(changes)
    return Header(**fields)


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _reference(replica: Replica) -> torch.Tensor:
    ids = torch.tensor([replica.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        return replica.model(input_ids=ids, use_cache=False).logits


def test_a_submitted_graph_runs_and_its_results_equal_plain_pytorch(engine, replica):
    body = _logits_request()
    job = engine.submit(None, _header(body), body)
    assert job.wait(WAIT) and job.error is None
    results = engine.results(job)
    values = codec.decode_results(results.document, [bytearray(blob) for blob in results.blobs])
    assert list(values) == [1]
    assert torch.equal(values[1], _reference(replica))
    assert engine.job(job.id, None) is job


def test_events_are_followed_on_an_event_loop(engine):
    body = _logits_request()
    job = engine.submit(None, _header(body), body)

    async def kinds() -> list[str]:
        return [event.kind async for event in engine.events(job)]
    assert asyncio.run(asyncio.wait_for(kinds(), WAIT)) == ["queued", "running", "done"]
    # A second watcher, after the end, sees the same log replayed.
    assert asyncio.run(asyncio.wait_for(kinds(), WAIT)) == ["queued", "running", "done"]


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"model": "nope"}, ModelNotFoundError, "no model named 'nope'"),
    ({"ir_version": 999}, VersionError, "sent version 999"),
    ({"graph_bytes": 10**12}, LimitError, "max_request_bytes"),
])
def test_a_header_is_refused_before_the_body_is_read(engine, changes, error, match):
    with pytest.raises(error, match=match):
        engine.admit(None, _header(b"", **changes))


def test_the_body_is_bounded_while_it_arrives(engine, replica):
    admission = engine.admit(None, _header(b"x", graph_bytes=replica.limits.max_request_bytes))
    admission.check_size(replica.limits.max_request_bytes)
    with pytest.raises(LimitError, match="max_request_bytes"):
        admission.check_size(replica.limits.max_request_bytes + 1)
    announced = engine.admit(None, _header(b"x" * 10))
    announced.check_size(10)
    with pytest.raises(ValidationError, match="announced 10 graph bytes; more arrived"):
        announced.check_size(11)


def test_a_body_that_is_not_what_the_header_said_or_not_a_graph_is_invalid(engine):
    body = _logits_request()
    with pytest.raises(ValidationError, match="announced"):
        engine.submit(None, _header(body, graph_bytes=len(body) + 1), body)
    with pytest.raises(ValidationError):
        engine.submit(None, _header(b"\xc1"), b"\xc1")


def test_permission_and_the_concurrent_job_quota(engine, replica):
    body = _logits_request()
    with pytest.raises(PermissionDeniedError):
        engine.admit(User("eve", models=frozenset({"other"})), _header(body))
    gate = threading.Event()

    def hold(*_: object) -> None:
        gate.wait(WAIT)
    handle = replica.model.register_forward_pre_hook(hold)
    try:
        alice = User("alice", max_concurrent=1)
        first = engine.submit(alice, _header(body), body)
        _until(lambda: first.state == "running")  # so that the next job cannot share its pass
        with pytest.raises(LimitError, match="max_concurrent"):
            engine.submit(alice, _header(body), body)
        queued = engine.submit(User("bob"), _header(body), body)
        assert engine.job(first.id, User("bob")) is None  # others' jobs do not exist
        engine.abandon(queued)  # its client went away while it waited
        assert isinstance(queued.error, CancelledError)
    finally:
        gate.set()
        handle.remove()
    assert first.wait(WAIT) and first.error is None
    second = engine.submit(alice, _header(body), body)  # the finished job no longer counts
    assert second.wait(WAIT) and second.error is None


def test_a_drained_engine_refuses_new_jobs(replica):
    engine = Engine({MODEL: replica})
    engine.close(grace=1)
    body = _logits_request()
    with pytest.raises(TransportError, match="shutting down"):
        engine.submit(None, _header(body), body)
