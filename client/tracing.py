"""Tracing contexts: `model.trace(...)` records a graph; leaving the block hands it to the runner.

Recording is plain operator overloading on proxies: no source parsing, no `settrace`, no threads.
Each node remembers the user's `file:line` that made it, so a server error points at that line.
Running the recorded request (transport calls, jobs, filling saved proxies) is `runner`'s job.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

import farscope.interventions as _interventions
from farscope.interventions import ops
from farscope.interventions.errors import TraceError
from farscope.interventions.graph import HookPoint

from . import tracer_stack
from .proxy import Proxy, to_argument
from .runner import Job, Request, Runner

__all__ = ["Tracer", "Session", "Cache"]

# Frames inside these folders are farscope's or torch's own; the first frame outside is the user's.
_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (__file__, _interventions.__file__, torch.__file__)
)


def _user_line() -> str:
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
    if frame is None:
        return ""
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class Session:
    """`with model.session():` several traces (and generates) sent as one request.

    Values of one trace can be used in later ones; they stay on the server unless saved.
    `model.session()` builds it with the model's runner, which runs the request when the block exits.
    """

    def __init__(self, model: Any, *, runner: Runner) -> None:
        self.model = model
        self.request = Request()
        self.is_open = False
        self._runner = runner

    def __enter__(self) -> Session:
        if tracer_stack.session_of(self.model) is not None:
            raise TraceError("sessions cannot be nested")
        self.is_open = True
        tracer_stack.push_session(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        tracer_stack.pop_session(self)
        self.is_open = False
        if exc_type is None and self.request.graph.nodes:
            self._runner.execute(self.request)


def _open_session(model: Any) -> Session | None:
    session = tracer_stack.session_of(model)
    return session if isinstance(session, Session) else None  # only Sessions are ever pushed


class _Steps:
    """`tracer.iter[a:b]`: generation steps to record interventions for."""

    def __init__(self, total: int, over: Callable[[Iterable[int]], Iterator[int]]) -> None:
        self.total = total
        self.over = over

    def __getitem__(self, which: int | slice | list[int]) -> Iterator[int]:
        if isinstance(which, slice):
            steps = list(range(self.total))[which]
        elif isinstance(which, int):
            steps = [which if which >= 0 else self.total + which]
        else:
            steps = [int(s) for s in which]
        return self.over(steps)


class Tracer:
    """Records interventions on one forward pass (or one generate); runs them when the block exits.

    Inside `model.session()`, the trace joins the session's request instead. `model.trace(...)` and
    `model.generate(...)` build it with the model's runner.
    """

    def __init__(self, model: Any, inputs: Any = None, *, mode: str = "trace",
                 options: dict[str, Any] | None = None, blocking: bool = True, runner: Runner) -> None:
        self.model = model
        self.blocking = blocking
        self.job: Job | None = None  # with blocking=False: the submitted job
        self.mode = mode
        self.options = dict(options or {})
        self.session = _open_session(model)
        self._runner = runner
        self._request = self.session.request if self.session is not None else Request()
        self.graph = self._request.graph
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
        if self.session is not None and any(t.session is self.session and t.is_open
                                            for t in tracer_stack.open_tracers()):
            raise TraceError("traces in a session run one after another; they cannot be nested")
        self.segment = self.graph.begin(self.mode, self.options)
        if self._inputs is not None:
            self.segment.invokes.append(self._inputs)
            self._invoke = 0
        self.is_open = True
        tracer_stack.push_tracer(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        tracer_stack.pop_tracer(self)
        self.is_open = False
        self._invoke = None
        if exc_type is not None:
            return
        if not self.segment.invokes:
            raise TraceError("nothing to run: pass an input to model.trace(...) or use tracer.invoke(...)")
        if self.session is None:
            if self.blocking:
                self._runner.execute(self._request)
            else:
                self.job = self._runner.submit(self._request)

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
        return _Steps(self.steps, self._over)

    def _over(self, steps: Iterable[int]) -> Iterator[int]:
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
        return self._hook(ops.READ, "", "result", invoke=self._invoke)

    # -- other interventions ---------------------------------------------------------------------

    def cache(self, modules: Any = None) -> Cache:
        """Save the output of every module (or of `modules`: envoys or paths), by module path.

        Like TransformerLens' `run_with_cache`: `cache["model.layers.5"]` after the trace.
        """
        if modules is None:
            # Containers are never called, and hooking attention probabilities would switch every
            # layer to eager attention: both are left out unless asked for by name.
            skipped = ("ModuleList", "ModuleDict", "AttentionHookPoint")
            chosen = [e for e in self.model.modules() if e.path and e.class_name not in skipped]
        else:
            chosen = [self._envoy_at(m) if isinstance(m, str) else m for m in modules]
        if self._invoke is None:
            raise TraceError("tracer.cache() records reads of this invoke's rows: call it inside an invoke")
        return Cache({envoy.path: self._hook(ops.READ, envoy.path, "output", invoke=self._invoke,
                                             optional=True).save() for envoy in chosen})

    def _envoy_at(self, path: str) -> Any:
        for envoy in self.model.modules():
            if envoy.path == path:
                return envoy
        raise AttributeError(f"the model has no module {path!r}")

    def stop(self) -> None:
        """End the forward pass here: nothing recorded after this line runs."""
        self.record(ops.STOP)

    def log(self, *values: Any) -> None:
        """Print `values` on the client while the job runs (they are computed on the server)."""
        self.record(ops.LOG, values)

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
        args: tuple = (HookPoint(module, point),) if op == ops.READ else (HookPoint(module, point), value)
        kwargs: dict[str, Any] = {"invoke": invoke}
        if self._call:
            kwargs["call"] = self._call
        if optional:
            kwargs["optional"] = True
        return self.record(op, args, kwargs)

    def save(self, proxy: Proxy) -> None:
        if proxy.tracer is not self:
            raise TraceError("a proxy can only be saved inside its own trace")
        self._check_open()
        save = self.record(ops.SAVE, (proxy,))
        self._request.saved[save.node.id] = proxy


class Cache(dict):
    """Saved module outputs by module path; after the trace, items are the values.

    Modules that did not run in the forward pass (e.g. a dropout that attention skips, or everything
    after an early stop) are left out.
    """

    def __getitem__(self, path: str) -> Any:
        proxy = super().__getitem__(path)
        if proxy.tracer.is_open:
            return proxy
        if proxy.missing is not None:
            raise KeyError(f"{path!r} did not run in this forward pass, so it has no cached output")
        return proxy.value

    def __contains__(self, path: object) -> bool:
        if not super().__contains__(path):
            return False
        proxy = super().__getitem__(path)
        return proxy.tracer.is_open or proxy.missing is None

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


def _check_input(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.int64)
    if isinstance(value, (str, list)):
        return value
    if hasattr(value, "keys") and "input_ids" in value:  # a tokenizer's BatchEncoding
        return _check_input(value["input_ids"])
    raise TraceError(f"unsupported input of type {type(value).__name__}: pass a string, a list of strings "
                     "or token ids")
