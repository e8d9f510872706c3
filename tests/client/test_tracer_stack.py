"""The tracer stack on its own: which trace records, per thread, with no model or server behind it."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest

from farscope.client import tracer_stack
from farscope.interventions.errors import TraceError


@dataclass(eq=False)
class _Session:
    model: Any
    is_open: bool = True


@dataclass(eq=False)
class _Tracer:
    """Only what the stack reads of a trace (`tracer_stack.OpenTracer` also lists the recording calls)."""

    model: Any
    is_open: bool = True
    session: _Session | None = None


def test_the_innermost_open_trace_of_a_model_records() -> None:
    model, other = object(), object()
    outer, inner, foreign = _Tracer(model), _Tracer(model), _Tracer(other)
    for tracer in (outer, inner, foreign):
        tracer_stack.push_tracer(tracer)
    try:
        assert tracer_stack.active_tracer(model) is inner
        assert tracer_stack.innermost_tracer() is foreign
        assert tracer_stack.open_tracers() == (outer, inner, foreign)
        inner.is_open = False  # a trace that has exited but is not yet popped does not record
        assert tracer_stack.active_tracer(model) is outer
    finally:
        for tracer in (foreign, inner, outer):
            tracer_stack.pop_tracer(tracer)
    with pytest.raises(TraceError, match="only inside"):
        tracer_stack.active_tracer(model)
    assert tracer_stack.innermost_tracer() is None


def test_sessions_are_found_by_model() -> None:
    model = object()
    session = _Session(model)
    assert tracer_stack.session_of(model) is None
    tracer_stack.push_session(session)
    try:
        assert tracer_stack.session_of(model) is session
        assert tracer_stack.session_of(object()) is None
    finally:
        tracer_stack.pop_session(session)
    assert tracer_stack.session_of(model) is None


def test_each_thread_has_its_own_stack() -> None:
    model = object()
    mine = _Tracer(model)
    seen: dict[str, Any] = {}
    entered, checked = threading.Event(), threading.Event()

    def other_thread() -> None:
        seen["before"] = tracer_stack.innermost_tracer()
        theirs = _Tracer(model)
        tracer_stack.push_tracer(theirs)
        entered.set()
        checked.wait(timeout=10)
        seen["theirs"] = tracer_stack.active_tracer(model) is theirs
        tracer_stack.pop_tracer(theirs)

    tracer_stack.push_tracer(mine)
    try:
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert entered.wait(timeout=10)
        assert tracer_stack.active_tracer(model) is mine  # the other thread's open trace is not ours
        checked.set()
        thread.join(timeout=10)
    finally:
        tracer_stack.pop_tracer(mine)
    assert seen == {"before": None, "theirs": True}
