"""Tracing contexts: `model.trace(...)` records a graph; leaving the block runs it remotely.

Recording is plain operator overloading on proxies: no source parsing, no `settrace`, no threads.
Each node remembers the user's `file:line` that made it, so a server error points at that line.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

import farscope.interventions as _interventions
from farscope.interventions import codec
from farscope.interventions.errors import FarscopeError, TraceError
from farscope.interventions.graph import Graph, HookPoint, Node, to_document

from .proxy import Proxy, to_argument

if TYPE_CHECKING:
    from .model import RemoteModel

__all__ = ["Tracer", "active_tracer"]

# Frames inside these folders are farscope's or torch's own; the first frame outside is the user's.
_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (__file__, _interventions.__file__, torch.__file__)
)

class _OpenTracers(threading.local):
    """Each thread's stack of open tracers: two threads tracing the same model never mix graphs."""

    def __init__(self) -> None:
        self.stack: list[Tracer] = []


_ACTIVE = _OpenTracers()


def _user_line() -> str:
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
    if frame is None:
        return ""
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _describe_where(where: str) -> str:
    path, _, line = where.rpartition(":")
    source = linecache.getline(path, int(line)).strip() if line.isdigit() else ""
    return f"{where}\n    {source}" if source else where


def active_tracer(model: RemoteModel) -> Tracer:
    for tracer in reversed(_ACTIVE.stack):
        if tracer.model is model:
            return tracer
    raise TraceError("module values (.output, .input, .inputs) exist only inside `with model.trace(...)`")


class Tracer:
    """Records interventions on one forward pass; runs them on the server when the block exits."""

    session = None  # sessions (several traces in one request) come later

    def __init__(self, model: RemoteModel, inputs: Any = None) -> None:
        self.model = model
        self.graph = Graph()
        self.is_open = False
        self._invoke: int | None = None
        self._implicit = inputs is not None
        self._saved: dict[int, Proxy] = {}
        if inputs is not None:
            self.graph.invokes.append(_check_input(inputs))

    # -- context -------------------------------------------------------------------------------

    def __enter__(self) -> Tracer:
        self.is_open = True
        if self._implicit:
            self._invoke = 0
        _ACTIVE.stack.append(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        _ACTIVE.stack.remove(self)
        self.is_open = False
        self._invoke = None
        if exc_type is not None:
            return
        if not self.graph.invokes:
            raise TraceError("nothing to run: pass an input to model.trace(...) or use tracer.invoke(...)")
        self._run()

    @contextlib.contextmanager
    def invoke(self, inputs: Any) -> Iterator[Tracer]:
        """A batch entry: interventions recorded inside apply to this input's rows only."""
        if self._implicit:
            raise TraceError("this trace already has an input (model.trace(input)); to batch several, "
                             "call model.trace() without one and use tracer.invoke(...) for each")
        if self._invoke is not None:
            raise TraceError("invokes cannot be nested")
        self.graph.invokes.append(_check_input(inputs))
        self._invoke = len(self.graph.invokes) - 1
        try:
            yield self
        finally:
            self._invoke = None

    # -- recording -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self.is_open:
            raise TraceError("this trace has already run; start a new `with model.trace(...)` block")

    def record(self, op: str, args: tuple = (), kwargs: dict | None = None) -> Proxy:
        self._check_open()
        node = self.graph.add(op, to_argument(tuple(args), self), to_argument(kwargs or {}, self),
                              where=_user_line())
        return Proxy(self, node)

    def hook(self, op: str, module: str, point: str, value: Any = None) -> Proxy:
        """Read (or write `value` into) a module's hook point, for the current invoke's rows."""
        self._check_open()
        if self._invoke is None:
            raise TraceError(f"{module or 'model'}.{point} is used outside an invoke: open "
                             "`with tracer.invoke(input):` first")
        args: tuple = (HookPoint(module, point),) if op == "read" else (HookPoint(module, point), value)
        return self.record(op, args, {"invoke": self._invoke})

    def save(self, proxy: Proxy) -> None:
        if proxy._tracer is not self:
            raise TraceError("a proxy can only be saved inside its own trace")
        self._check_open()
        save = self.record("save", (proxy,))
        self._saved[save.node.id] = proxy

    # -- running -------------------------------------------------------------------------------

    def _run(self) -> None:
        document = codec.encode(to_document(self.graph))
        try:
            results = self.model._transport.execute(self.model.name, document)
        except FarscopeError as error:
            raise self._located(error) from error.__cause__
        for node_id, proxy in self._saved.items():
            proxy._set_value(results[node_id])

    def _located(self, error: FarscopeError) -> FarscopeError:
        """The error, pointing at the user's line that recorded the failing node."""
        if error.node_id is not None and 0 <= error.node_id < len(self.graph.nodes):
            node: Node = self.graph.nodes[error.node_id]
            error.node = node.format()
            error.where = _describe_where(node.where) if node.where else None
        return error


def _check_input(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.int64)
    if isinstance(value, (str, list)):
        return value
    if hasattr(value, "keys") and "input_ids" in value:  # a tokenizer's BatchEncoding
        return _check_input(value["input_ids"])
    raise TraceError(f"unsupported input of type {type(value).__name__}: pass a string, a list of strings "
                     "or token ids")
