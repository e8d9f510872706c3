"""Which traces and sessions are open, per thread, innermost last.

Envoys and proxies find the trace that records what is done to them here, so they need not import
the tracing contexts. This module imports nothing else of the client: the objects on the stack are
described by the protocols below, which `tracing.Tracer` and `tracing.Session` satisfy.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from farscope.interventions.errors import TraceError

__all__ = [
    "OpenSession",
    "OpenTracer",
    "active_tracer",
    "innermost_tracer",
    "open_tracers",
    "pop_session",
    "pop_tracer",
    "push_session",
    "push_tracer",
    "session_of",
]


class OpenSession(Protocol):
    """What the stack, proxies and envoys need of a session."""

    model: Any
    is_open: bool
    between: Any  # the ended trace recording what is done between traces (an OpenTracer), or None


class OpenTracer(Protocol):
    """What the stack, proxies and envoys need of a trace: its state and its two recording calls."""

    model: Any
    is_open: bool
    session: OpenSession | None

    def record(self, op: str, args: tuple = (), kwargs: dict | None = None) -> Any: ...

    def hook(self, op: str, module: str, point: str, value: Any = None) -> Any: ...

    def save(self, proxy: Any) -> None: ...

    def keep(self, container: Any) -> None: ...

    def next(self, step: int = 1) -> Any: ...


class _OpenContexts(threading.local):
    """Each thread's open tracers and sessions: two threads tracing one model never mix graphs."""

    def __init__(self) -> None:
        self.tracers: list[OpenTracer] = []
        self.sessions: list[OpenSession] = []


_OPEN = _OpenContexts()


def push_tracer(tracer: OpenTracer) -> None:
    _OPEN.tracers.append(tracer)


def pop_tracer(tracer: OpenTracer) -> None:
    _OPEN.tracers.remove(tracer)


def push_session(session: OpenSession) -> None:
    _OPEN.sessions.append(session)


def pop_session(session: OpenSession) -> None:
    _OPEN.sessions.remove(session)


def open_tracers() -> tuple[OpenTracer, ...]:
    """This thread's open tracers, outermost first."""
    return tuple(_OPEN.tracers)


def active_tracer(model: Any) -> OpenTracer:
    """The innermost open trace of `model` in this thread; module values exist only inside one."""
    for tracer in reversed(_OPEN.tracers):
        if tracer.model is model and tracer.is_open:
            return tracer
    raise TraceError("module values (.output, .input, .inputs) exist only inside `with model.trace(...)`")


def innermost_tracer() -> OpenTracer | None:
    """The innermost open trace of any model in this thread, if one is open."""
    for tracer in reversed(_OPEN.tracers):
        if tracer.is_open:
            return tracer
    return None


def session_of(model: Any) -> OpenSession | None:
    """The session of `model` open in this thread, if any (a trace started now joins it)."""
    for session in reversed(_OPEN.sessions):
        if session.model is model:
            return session
    return None
