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
from farscope.interventions.errors import FarscopeError, TraceError
from farscope.interventions.graph import Graph, HookPoint, Node

from .proxy import Proxy, to_argument

if TYPE_CHECKING:
    from .model import RemoteModel

__all__ = ["Tracer", "Session", "Cache", "Job", "active_tracer", "innermost_tracer"]

# Frames inside these folders are farscope's or torch's own; the first frame outside is the user's.
_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (__file__, _interventions.__file__, torch.__file__)
)

class _OpenTracers(threading.local):
    """Each thread's open tracers and sessions: two threads tracing one model never mix graphs."""

    def __init__(self) -> None:
        self.stack: list[Tracer] = []
        self.sessions: list[Session] = []


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
        if tracer.model is model and tracer.is_open:
            return tracer
    raise TraceError("module values (.output, .input, .inputs) exist only inside `with model.trace(...)`")


def innermost_tracer() -> Tracer | None:
    for tracer in reversed(_ACTIVE.stack):
        if tracer.is_open:
            return tracer
    return None


class _Run:
    """What runs a graph and fills the saved proxies: a lone trace, or a session of several."""

    def __init__(self, model: RemoteModel) -> None:
        self.model = model
        self.graph = Graph()
        self.saved: dict[int, Proxy] = {}
        self.missing: dict[int, str] = {}

    def execute(self) -> None:
        try:
            results = self.model._transport.execute(self.model.name, self.graph, on_log=self.model._on_log)
        except FarscopeError as error:
            raise _located(self.graph, error) from error.__cause__
        self.fill(results)

    def submit(self) -> Job:
        try:
            job_id = self.model._transport.submit(self.model.name, self.graph)
        except FarscopeError as error:
            raise _located(self.graph, error) from error.__cause__
        return Job(self.model, job_id, self)

    def fill(self, results: dict[int, Any]) -> None:
        for node_id, proxy in self.saved.items():
            if node_id in results:
                proxy._set_value(results[node_id])
            else:
                proxy._set_missing("it was never computed: its generation step was not reached (generation "
                                   "ended early) or the forward pass stopped before it")


class Job:
    """A submitted job: poll it, wait for it, cancel it; its saved proxies fill when it is waited on.

    `model.job(job_id)` reattaches to a job from another process (then `wait()` returns the saved
    values by node id, as there are no proxies to fill).
    """

    def __init__(self, model: RemoteModel, job_id: str, run: _Run | None = None) -> None:
        self.model = model
        self.id = job_id
        self._run = run
        self._error: FarscopeError | None = None
        self._finished = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"farscope-watch-{job_id[:8]}", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        try:
            self.model._transport.watch(self.id, on_log=self.model._on_log)
        except FarscopeError as error:
            self._error = _located(self._run.graph, error) if self._run is not None else error
        finally:
            self._finished.set()

    def done(self) -> bool:
        """Whether the job has finished (successfully or not)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> dict[int, Any]:
        """Block until the job finishes; raise its error, or fill the saved proxies and return values."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        results = self.model._transport.fetch(self.id)
        if self._run is not None:
            self._run.fill(results)
        return results

    def cancel(self) -> str:
        """Ask the server to cancel; returns the job's state as the server saw it."""
        return self.model._transport.cancel(self.id)

    def __repr__(self) -> str:
        return f"<farscope.Job {self.id} {'finished' if self.done() else 'pending'}>"


class Session:
    """`with model.session():` several traces (and generates) sent as one request.

    Values of one trace can be used in later ones; they stay on the server unless saved.
    """

    def __init__(self, model: RemoteModel) -> None:
        self.run = _Run(model)
        self.model = model
        self.is_open = False

    def __enter__(self) -> Session:
        if _session_of(self.model) is not None:
            raise TraceError("sessions cannot be nested")
        self.is_open = True
        _ACTIVE.sessions.append(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        _ACTIVE.sessions.remove(self)
        self.is_open = False
        if exc_type is None and self.run.graph.nodes:
            self.run.execute()


def _session_of(model: RemoteModel) -> Session | None:
    for session in reversed(_ACTIVE.sessions):
        if session.model is model:
            return session
    return None


class _Steps:
    """`tracer.iter[a:b]`: generation steps to record interventions for."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def __getitem__(self, which: int | slice | list[int]) -> Iterator[int]:
        total = self.tracer.steps
        if isinstance(which, slice):
            steps = list(range(total))[which]
        elif isinstance(which, int):
            steps = [which if which >= 0 else total + which]
        else:
            steps = [int(s) for s in which]
        return self.tracer._over(steps)


class Tracer:
    """Records interventions on one forward pass (or one generate); runs them when the block exits.

    Inside `model.session()`, the trace joins the session's request instead.
    """

    def __init__(self, model: RemoteModel, inputs: Any = None, *, mode: str = "trace",
                 options: dict[str, Any] | None = None, blocking: bool = True) -> None:
        self.model = model
        self.blocking = blocking
        self.job: Job | None = None  # with blocking=False: the submitted job
        self.mode = mode
        self.options = dict(options or {})
        self.session = _session_of(model)
        self._run = self.session.run if self.session is not None else _Run(model)
        self.graph = self._run.graph
        self.segment = None
        self.is_open = False
        self._invoke: int | None = None
        self._call = 0
        self._inputs = None if inputs is None else _check_input(inputs)

    @property
    def steps(self) -> int:
        """How many generation steps this generate runs (1 for a trace)."""
        return int(self.options.get("max_new_tokens", 1))

    # -- context -------------------------------------------------------------------------------

    def __enter__(self) -> Tracer:
        if self.session is not None and any(t.session is self.session and t.is_open for t in _ACTIVE.stack):
            raise TraceError("traces in a session run one after another; they cannot be nested")
        self.segment = self.graph.begin(self.mode, self.options)
        if self._inputs is not None:
            self.segment.invokes.append(self._inputs)
            self._invoke = 0
        self.is_open = True
        _ACTIVE.stack.append(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        _ACTIVE.stack.remove(self)
        self.is_open = False
        self._invoke = None
        if exc_type is not None:
            return
        if not self.segment.invokes:
            raise TraceError("nothing to run: pass an input to model.trace(...) or use tracer.invoke(...)")
        if self.session is None:
            if self.blocking:
                self._run.execute()
            else:
                self.job = self._run.submit()

    @contextlib.contextmanager
    def invoke(self, inputs: Any) -> Iterator[Tracer]:
        """A batch entry: interventions recorded inside apply to this input's rows only."""
        if self._inputs is not None:
            raise TraceError("this trace already has an input (model.trace(input)); to batch several, "
                             "call model.trace() without one and use tracer.invoke(...) for each")
        if self._invoke is not None:
            raise TraceError("invokes cannot be nested")
        self.segment.invokes.append(_check_input(inputs))
        self._invoke = len(self.segment.invokes) - 1
        try:
            yield self
        finally:
            self._invoke = None

    # -- generation steps ----------------------------------------------------------------------

    def all(self) -> Iterator[int]:
        """Every generation step: `for step in tracer.all(): ...` records the body once per step."""
        return self._over(range(self.steps))

    @property
    def iter(self) -> _Steps:
        """Chosen steps: `for step in tracer.iter[2:5]:` (an int, a slice or a list of steps)."""
        return _Steps(self)

    def _over(self, steps: Any) -> Iterator[int]:
        for step in steps:
            if not 0 <= step < self.steps:
                raise TraceError(f"step {step} is outside this generation's {self.steps} steps")
            self._call = step
            try:
                yield step
            finally:
                self._call = 0

    @property
    def result(self) -> Proxy:
        """The generated token ids (prompt included, left-padded), of this invoke or of the batch."""
        if self.mode != "generate":
            raise TraceError("tracer.result exists under model.generate(...)")
        return self._hook("read", "", "result", invoke=self._invoke)

    # -- other interventions ---------------------------------------------------------------------

    def cache(self, modules: Any = None) -> Cache:
        """Save the output of every module (or of `modules`: envoys or paths), by module path.

        Like TransformerLens' `run_with_cache`: `cache["model.layers.5"]` after the trace.
        """
        if modules is None:
            # Containers are never called, and hooking attention probabilities would switch every
            # layer to eager attention: both are left out unless asked for by name.
            skipped = ("ModuleList", "ModuleDict", "AttentionHookPoint")
            chosen = [e for e in self.model.modules() if e.path and e._class_name not in skipped]
        else:
            chosen = [self.model._envoy_at(m) if isinstance(m, str) else m for m in modules]
        if self._invoke is None:
            raise TraceError("tracer.cache() records reads of this invoke's rows: call it inside an invoke")
        return Cache({envoy.path: self._hook("read", envoy.path, "output", invoke=self._invoke,
                                             optional=True).save() for envoy in chosen})

    def stop(self) -> None:
        """End the forward pass here: nothing recorded after this line runs."""
        self.record("stop")

    def log(self, *values: Any) -> None:
        """Print `values` on the client while the job runs (they are computed on the server)."""
        self.record("log", values)

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
        """Read, write or skip a module's hook point, for the current invoke's rows and step."""
        if self._invoke is None:
            raise TraceError(f"{module or 'model'}.{point} is used outside an invoke: open "
                             "`with tracer.invoke(input):` first")
        return self._hook(op, module, point, value, invoke=self._invoke)

    def _hook(self, op: str, module: str, point: str, value: Any = None, *, invoke: int | None,
              optional: bool = False) -> Proxy:
        self._check_open()
        args: tuple = (HookPoint(module, point),) if op == "read" else (HookPoint(module, point), value)
        kwargs: dict[str, Any] = {"invoke": invoke}
        if self._call:
            kwargs["call"] = self._call
        if optional:
            kwargs["optional"] = True
        return self.record(op, args, kwargs)

    def save(self, proxy: Proxy) -> None:
        if proxy._tracer is not self:
            raise TraceError("a proxy can only be saved inside its own trace")
        self._check_open()
        save = self.record("save", (proxy,))
        self._run.saved[save.node.id] = proxy


class Cache(dict):
    """Saved module outputs by module path; after the trace, items are the values.

    Modules that did not run in the forward pass (e.g. a dropout that attention skips, or everything
    after an early stop) are left out.
    """

    def __getitem__(self, path: str) -> Any:
        proxy = super().__getitem__(path)
        if proxy._tracer.is_open:
            return proxy
        if proxy._missing is not None:
            raise KeyError(f"{path!r} did not run in this forward pass, so it has no cached output")
        return proxy.value

    def __contains__(self, path: object) -> bool:
        return super().__contains__(path) and (super().__getitem__(path)._tracer.is_open
                                               or super().__getitem__(path)._missing is None)

    def __iter__(self) -> Any:
        return (path for path in super().__iter__() if path in self)

    def keys(self) -> Any:
        return list(iter(self))

    def items(self) -> Any:
        return [(path, self[path]) for path in self]

    def values(self) -> Any:
        return [self[path] for path in self]

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _located(graph: Graph, error: FarscopeError) -> FarscopeError:
    """The error, pointing at the user's line that recorded the failing node."""
    if error.node_id is not None and 0 <= error.node_id < len(graph.nodes):
        node: Node = graph.nodes[error.node_id]
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
