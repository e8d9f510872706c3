"""Health follows the workers: while a model's worker is down, the gRPC health service says NOT_SERVING
for that model and overall, and SERVING again once it is back (real server, loopback).

A scheduler reports its worker's health through the `on_health` callback the engine hands it; the
tests call that callback (`Engine.worker_health`) as a worker thread would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import farscope
from farscope.server import engine as engine_module
from farscope.server import scheduler as scheduler_module
from farscope.server.engine import Engine
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.service import SERVICE_NAME, Server, model_health_name, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MODELS = ("one", "two")


@pytest.fixture(scope="module")
def server(tiny_spec) -> Iterator[Server]:
    running = start_server({name: Replica(load_model(tiny_spec("llama", name=name))) for name in MODELS})
    try:
        yield running
    finally:
        running.stop(grace=0)


def _status(server: Server, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _report_from_a_worker_thread(server: Server, model: str, healthy: bool) -> None:
    thread = threading.Thread(target=server.engine.worker_health, args=(model, healthy))
    thread.start()
    thread.join()


def test_health_says_not_serving_while_a_worker_is_down(server) -> None:
    assert all(_status(server, s) == SERVING for s in ("", SERVICE_NAME, *map(model_health_name, MODELS)))
    _report_from_a_worker_thread(server, "one", False)
    try:
        _until(lambda: _status(server, "") == NOT_SERVING, "overall NOT_SERVING")
        assert _status(server, SERVICE_NAME) == NOT_SERVING
        assert _status(server, model_health_name("one")) == NOT_SERVING
        assert _status(server, model_health_name("two")) == SERVING  # the other model is fine
        assert not server.engine.healthy and server.engine.down == {"one"}
        with farscope.RemoteModel("two", address=f"127.0.0.1:{server.port}") as two, two.trace("hello"):
            logits = two.lm_head.output.save()
        assert torch.isfinite(logits.value).all()  # and still serves
    finally:
        _report_from_a_worker_thread(server, "one", True)
    _until(lambda: _status(server, "") == SERVING, "overall SERVING again")
    assert all(_status(server, s) == SERVING for s in (SERVICE_NAME, *map(model_health_name, MODELS)))
    assert server.engine.healthy


def test_quick_flaps_end_in_the_last_reported_state(server) -> None:
    for healthy in (False, True, False, True, False):
        server.engine.worker_health("two", healthy)
    try:
        _until(lambda: _status(server, model_health_name("two")) == NOT_SERVING, "two NOT_SERVING")
        time.sleep(0.2)  # every refresh queued by the flaps has run by now
        assert _status(server, "") == NOT_SERVING
    finally:
        server.engine.worker_health("two", True)
    _until(lambda: _status(server, "") == SERVING, "overall SERVING again")


# -- the engine's side, with stand-in schedulers --------------------------------------------------


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


class _ReportingScheduler:
    """A scheduler with the `on_health` keyword (the scheduler that supervises its worker)."""

    made: list[_ReportingScheduler] = []

    def __init__(self, replica: Any, *, cobatch: bool = True, on_health: Callable[[bool], None] | None = None) -> None:
        self.on_health = on_health
        self.depth = 0
        self.running = ()
        _ReportingScheduler.made.append(self)


def test_the_engine_hands_its_schedulers_a_health_callback(monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "Scheduler", _ReportingScheduler)
    engine = Engine()
    heard: list[tuple[str, bool]] = []
    engine.watch_health(lambda model, healthy: heard.append((model, healthy)))
    engine.watch_health(lambda model, healthy: 1 / 0)  # a broken listener reaches no worker thread
    engine.add(_Named("m"))  # type: ignore[arg-type]
    scheduler = _ReportingScheduler.made[-1]
    assert scheduler.on_health is not None
    def worker_up() -> float | None:
        return engine.metrics.registry.get_sample_value("farscope_worker_up", {"model": "m"})

    assert worker_up() == 1
    scheduler.on_health(False)
    scheduler.on_health(False)  # no change: no news
    assert not engine.healthy and engine.down == {"m"} and worker_up() == 0
    scheduler.on_health(True)
    assert engine.healthy and heard == [("m", False), ("m", True)] and worker_up() == 1


def test_a_real_worker_failure_shows_in_health_until_its_restart(server, monkeypatch) -> None:
    """The real scheduler's loop fails (a bug in its own accounting): the job in its hands fails clearly,
    health says NOT_SERVING while the worker waits to restart, SERVING once it is back and serving."""
    scheduler = server.engine.schedulers["one"]
    monkeypatch.setattr(scheduler_module, "FIRST_BACKOFF", 1.5)  # a window wide enough to see
    real, broken = scheduler._charge, []

    def charge_once_broken(*args: Any) -> None:
        if not broken:
            broken.append(True)
            raise KeyError("a bug in the accounting")
        real(*args)
    monkeypatch.setattr(scheduler, "_charge", charge_once_broken)
    with farscope.RemoteModel("one", address=f"127.0.0.1:{server.port}") as one:
        with pytest.raises(farscope.FarscopeError, match="worker of model 'one' failed"), one.trace("hello"):
            one.lm_head.output.save()
        _until(lambda: _status(server, "") == NOT_SERVING, "NOT_SERVING while the worker is down", timeout=1.4)
        assert _status(server, model_health_name("one")) == NOT_SERVING
        _until(lambda: _status(server, "") == SERVING, "SERVING once the worker is back")
        with one.trace("hello"):
            logits = one.lm_head.output.save()
    assert torch.isfinite(logits.value).all() and scheduler.healthy and scheduler.restarts >= 1
