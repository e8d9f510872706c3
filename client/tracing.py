"""Tracing contexts: `model.trace(...)` records a graph; leaving the block hands it to the runner.

Recording is plain operator overloading on proxies: no `settrace`, no threads. The one exception that
reads source is `lowering` (Python `if` on a traced value -> a conditional block); the tracer only
tells it before each node is recorded.
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
from farscope.interventions.graph import HookPoint, Ref, map_args

from . import tracer_stack
from .lowering import Branches
from .proxy import Proxy, SavedTensor, to_argument
from .runner import Job, Request, Runner
from .shapes import LENGTH, Shapes, ShapeUnknown

__all__ = ["Tracer", "Scan", "Session", "Cache", "CacheEntry", "Barrier", "SavedList", "SavedDict", "save"]

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
        self.containers: list[SavedList | SavedDict] = []  # farscope.list()/dict()/save([...]) of its traces
        # The latest trace that ended: what is done to traced values between two traces records into it
        # (session-level nodes: they run on the server after that trace, before the next).
        self.between: Tracer | None = None
        self.is_open = False
        self._runner = runner
        self.shapes = Shapes(self.request.graph, _scans_of(model))  # its traces' values' shapes

    def __enter__(self) -> Session:
        if tracer_stack.session_of(self.model) is not None:
            raise TraceError("sessions cannot be nested")
        self.is_open = True
        tracer_stack.push_session(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        tracer_stack.pop_session(self)
        if self.between is not None and exc_type is None:
            self.between.branches.close_all()
        self.is_open = False
        self.between = None
        if exc_type is None and self.request.graph.nodes:
            self._runner.execute(self.request)
            _fill_containers(self.containers)

    def barrier(self, participants: int = 0) -> Barrier:
        return Barrier(participants)


def _open_session(model: Any) -> Session | None:
    session = tracer_stack.session_of(model)
    return session if isinstance(session, Session) else None  # only Sessions are ever pushed


class _Steps:
    """`tracer.iter[a:b]`: generation steps to record interventions for."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def __getitem__(self, which: int | slice | list[int]) -> _StepLoop:
        total = self.tracer.steps
        if isinstance(which, slice):
            steps = list(range(total))[which]
        elif isinstance(which, int):
            steps = [which if which >= 0 else total + which]
        else:
            steps = [int(s) for s in which]
        return _StepLoop(self.tracer, steps)


class _StepLoop:
    """The chosen steps, iterated or entered.

    `for step in tracer.iter[...]:` runs the body once per step, recording it for that step.
    `with tracer.iter[...]:` (NNsight's context-manager form) runs its body once, in Python: it is
    recorded for the first step, and on exit the nodes it recorded are recorded again for each later
    step, hook points moved to that step. Items the body appended to a `farscope.list()` are appended
    again, one per step; other Python side effects of the body happen once.
    """

    def __init__(self, tracer: Tracer, steps: list[int]) -> None:
        self.tracer = tracer
        self.steps = steps
        self._entered: Iterator[int] | None = None
        self._block: _StepBlock | None = None

    def __iter__(self) -> Iterator[int]:
        return self.tracer.over_steps(self.steps)

    def __enter__(self) -> _StepLoop:
        if not self.steps:
            raise TraceError("`with tracer.iter[...]:` selects no generation step")
        self._entered = self.tracer.over_steps(self.steps)
        next(self._entered)
        self._block = self.tracer.open_step_block()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        block, self._block = self._block, None
        entered, self._entered = self._entered, None
        if entered is not None:
            entered.close()
        if block is not None:
            self.tracer.close_step_block(block, self.steps[1:] if exc_type is None else [])


class _StepBlock:
    """What a `with tracer.iter[...]:` body recorded: where its nodes start, and its list appends."""

    def __init__(self, first_node: int) -> None:
        self.first_node = first_node
        self.appends: list[tuple[SavedList, int]] = []  # (the list, the appended value's node id)


class Tracer:
    """Records interventions on one forward pass (or one generate); runs them when the block exits.

    Inside `model.session()`, the trace joins the session's request instead. `model.trace(...)` and
    `model.generate(...)` build it with the model's runner.
    """

    def __init__(self, model: Any, inputs: Any = None, *, mode: str = "trace",
                 options: dict[str, Any] | None = None, blocking: bool = True, runner: Runner,
                 edits: Iterable[Callable[[Tracer], None]] = ()) -> None:
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
        self._whole_batch = False  # inside an empty `tracer.invoke()`: reads span every invoke's rows
        self._call = 0
        self._inputs = None if inputs is None else _check_input(inputs)
        self._edits = tuple(edits)  # model.edit() bodies: recorded first, into every invoke
        self._step_block: _StepBlock | None = None  # an open `with tracer.iter[...]:` body
        self._containers: list[SavedList | SavedDict] = []
        self.branches = Branches(self)  # conditional blocks open in this trace (lowering.py)
        # Shapes while recording (shapes.py): a session's traces share their request's.
        self.shapes = self.session.shapes if self.session is not None else Shapes(self.graph, _scans_of(model))

    @property
    def steps(self) -> int:
        """How many generation steps this generate runs (1 for a trace)."""
        return int(self.options.get("max_new_tokens", 1))

    # -- context -------------------------------------------------------------------------------

    def __enter__(self) -> Tracer:
        if self.session is not None and any(t.session is self.session and t.is_open
                                            for t in tracer_stack.open_tracers()):
            raise TraceError("traces in a session run one after another; they cannot be nested")
        if self.session is not None and self.session.between is not None:
            self.session.between.branches.close_before_trace()
        self.segment = self.graph.begin(self.mode, self.options)
        self.is_open = True
        tracer_stack.push_tracer(self)
        if self._inputs is not None:
            self.segment.invokes.append(self._inputs)
            self._invoke = 0
            self._apply_edits()
        return self

    def _end_recording(self, exc_type: Any, what: str) -> bool:
        """Close the block: open branches end, containers keep their items, the tracer leaves the stack.
        Whether recording ended normally (no exception) with something to `what` (run, scan)."""
        if exc_type is None:
            self.branches.close_all()
            for container in self._containers:  # what was put in them is sent back
                container.save_items()
        tracer_stack.pop_tracer(self)
        self.is_open = False
        self._invoke = None
        if exc_type is not None:
            return False
        if not self.segment.invokes:
            raise TraceError(f"nothing to {what}: pass an input to model.{'trace' if what == 'run' else what}(...) "
                             "or use tracer.invoke(...)")
        return True

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._end_recording(exc_type, "run"):
            return
        self._check_shapes_read()
        if self.session is not None:
            self.session.containers.extend(self._containers)
            self.session.between = self
        elif self.blocking:
            self._runner.execute(self._request)
            _fill_containers(self._containers)
        else:
            self.job = self._runner.submit(self._request)

    def _check_shapes_read(self) -> None:
        """Shapes read while recording hold for the batch of the invokes given so far; a later, longer
        invoke pads every row further. Refuse rather than run a graph built on stale shapes."""
        read_for = self.shapes.lengths.get(id(self.segment))
        if read_for is None:
            return
        length = self.model.scan_document(self.segment)[LENGTH]
        if length != read_for:
            raise TraceError(f"shapes were read while recording for a batch padded to {read_for} tokens, but "
                             f"the later invokes pad it to {length}: read shapes after the longest invoke, or "
                             "put the longest input first")

    def _apply_edits(self) -> None:
        """Record the model's persistent edits (`model.edit()`) into the current invoke."""
        for edit in self._edits:
            edit(self)

    @contextlib.contextmanager
    def invoke(self, *inputs: Any) -> Iterator[Tracer]:
        """A batch entry: interventions recorded inside apply to this input's rows only.

        `tracer.invoke([p1, p2])` is one entry of two rows. An empty `tracer.invoke()` adds no input:
        what it reads spans the whole batch (every invoke's rows), as in NNsight.
        """
        if len(inputs) > 1:
            raise TraceError("tracer.invoke takes one input: a prompt, a list of prompts or token ids")
        if self._invoke is not None or self._whole_batch:
            raise TraceError("invokes cannot be nested")
        if not inputs:
            self._whole_batch = True
            try:
                yield self
            finally:
                self._whole_batch = False
            return
        if self._inputs is not None:
            raise TraceError("this trace already has an input (model.trace(input)); to batch several, "
                             "call model.trace() without one and use tracer.invoke(...) for each")
        self.segment.invokes.append(_check_input(inputs[0]))
        self._invoke = len(self.segment.invokes) - 1
        self._apply_edits()
        try:
            yield self
        finally:
            self._invoke = None

    def barrier(self, participants: int = 0) -> Barrier:
        """Accepted as in NNsight (`barrier = tracer.barrier(2)`, then `barrier()` in each invoke).

        farscope needs none: values flow between invokes by reference in the recorded graph.
        """
        return Barrier(participants)

    # -- generation steps ----------------------------------------------------------------------

    def all(self) -> _StepLoop:
        """Every generation step: `for step in tracer.all(): ...` records the body once per step."""
        return _StepLoop(self, list(range(self.steps)))

    @property
    def iter(self) -> _Steps:
        """Chosen steps: `for step in tracer.iter[2:5]:` (an int, a slice or a list of steps), or
        `with tracer.iter[2:5]:`."""
        return _Steps(self)

    def over_steps(self, steps: Iterable[int]) -> Iterator[int]:
        """Each of `steps` in turn, recording what is done meanwhile for that generation step."""
        return self._over(steps)

    def open_step_block(self) -> _StepBlock:
        if self._step_block is not None:
            raise TraceError("`with tracer.iter[...]:` blocks cannot be nested")
        self._step_block = _StepBlock(len(self.graph.nodes))
        return self._step_block

    def close_step_block(self, block: _StepBlock, later_steps: list[int]) -> None:
        """Record the block's nodes again for each of `later_steps` (see `_StepLoop`)."""
        self._step_block = None
        nodes = [n for n in self.graph.nodes[block.first_node:] if n.op != ops.SAVE]
        for step in later_steps:
            copies: dict[int, int] = {}

            def remap(value: Any, copies: dict[int, int] = copies) -> Any:
                return Ref(copies[value.id]) if isinstance(value, Ref) and value.id in copies else value
            for node in nodes:
                kwargs = map_args(dict(node.kwargs), remap)
                if ops.REGISTRY[node.op].hooked:
                    kwargs.pop("call", None)
                    if step:
                        kwargs["call"] = step
                copies[node.id] = self.record(node.op, map_args(node.args, remap), kwargs).node.id
            for container, node_id in block.appends:
                container.append(Proxy(self, self.graph.nodes[copies[node_id]]))

    def note_append(self, container: SavedList, item: Any) -> None:
        """A traced `item` appended to `container` inside a `with tracer.iter[...]:` body."""
        if self._step_block is not None and isinstance(item, Proxy | SavedTensor) and item.tracer is self:
            self._step_block.appends.append((container, item.node.id))

    def next(self, step: int = 1) -> Tracer:
        """Record what follows for the generation step `step` later (NNsight's `tracer.next()`)."""
        target = self._call + step
        if not 0 <= target < self.steps:
            raise TraceError(f"step {target} is outside this generation's {self.steps} steps")
        self._call = target
        return self

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

    @property
    def invoke_rows(self) -> int | None:
        """The current invoke (None outside one, or inside an empty `tracer.invoke()`)."""
        return self._invoke

    # -- other interventions ---------------------------------------------------------------------

    def cache(self, modules: Any = None, include_inputs: bool = False) -> Cache:
        """Save the output (and with `include_inputs`, the inputs) of every module, or of `modules`
        (envoys or paths), as NNsight does: `cache["model.model.layers.5"].output` after the trace, or
        `cache.model.model.layers[5].output`. Keys are the envoy paths NNsight prints (`model.` + the
        module path); a module's own path (`"model.layers.5"`) is accepted too.
        """
        if modules is None:
            # Containers are never called, and hooking attention probabilities would switch every
            # layer to eager attention: both are left out unless asked for by name.
            skipped = ("ModuleList", "ModuleDict", "AttentionHookPoint")
            chosen = [e for e in self.model.modules() if e.path and e.class_name not in skipped]
        else:
            chosen = [self._envoy_at(m) if isinstance(m, str) else m for m in modules]
        if self._invoke is None and not self._whole_batch and len(self.segment.invokes) != 1:
            raise TraceError("tracer.cache() records reads of one invoke's rows (or, in an empty "
                             "tracer.invoke(), of the whole batch): call it inside an invoke")
        invoke = self._invoke if not self._whole_batch and self._invoke is not None else None
        if invoke is None and not self._whole_batch:
            invoke = 0  # a trace of one input: its one invoke

        def read(path: str, point: str) -> Any:
            return self._hook(ops.READ, path, point, invoke=invoke, optional=True).save()
        return Cache({envoy.path: CacheEntry(envoy.path, read(envoy.path, "output"),
                                             read(envoy.path, "inputs") if include_inputs else None)
                      for envoy in chosen})

    def _envoy_at(self, path: str) -> Any:
        """The envoy at a module path, or at NNsight's envoy path (`model.` + the module path)."""
        envoys = {envoy.path: envoy for envoy in self.model.modules()}
        for candidate in (path, _module_path(path)):
            if candidate in envoys:
                return envoys[candidate]
        raise AttributeError(f"the model has no module {path!r}")

    @contextlib.contextmanager
    def cond(self, condition: Any) -> Iterator[None]:
        """`with tracer.cond(x > 0):` what the block records runs only if the condition holds on the
        server (a bool, or a one-element tensor). A plain `if x > 0:` records the same."""
        block = self.branches.open_if(condition)
        try:
            yield
        finally:
            self.branches.close(block)

    @contextlib.contextmanager
    def else_(self) -> Iterator[None]:
        """`with tracer.else_():` right after a `with tracer.cond(...)` block: runs when it did not."""
        block = self.branches.open_else()
        try:
            yield
        finally:
            self.branches.close(block)

    def stop(self) -> None:
        """End the forward pass here: nothing recorded after this line runs."""
        self.record(ops.STOP)

    def log(self, *values: Any) -> None:
        """Print `values` on the client while the job runs (they are computed on the server)."""
        self.record(ops.LOG, values)

    # -- recording -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self.is_open and not self.records_between():
            raise TraceError("this trace has already run; start a new `with model.trace(...)` block")

    def records_between(self) -> bool:
        """Whether this ended trace records what is done between it and the next trace of its session."""
        return (self.session is not None and self.session.is_open and self.session.between is self
                and not any(t.session is self.session and t.is_open for t in tracer_stack.open_tracers()))

    def record(self, op: str, args: tuple = (), kwargs: dict | None = None) -> Proxy:
        self._check_open()
        self.branches.before_record()
        node = self.graph.add(op, to_argument(tuple(args), self), to_argument(kwargs or {}, self),
                              where=_user_line())
        return Proxy(self, node)

    def hook(self, op: str, module: str, point: str, value: Any = None) -> Proxy:
        """Read, write or skip a module's hook point, for the current invoke's rows and step."""
        if self._whole_batch:
            return self._hook(op, module, point, value, invoke=None)
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
        if proxy.tracer is not self and (self.session is None or proxy.tracer.session is not self.session):
            raise TraceError("a proxy can only be saved inside its own trace (or session)")
        self._check_open()
        save = self.record(ops.SAVE, (proxy,))
        self._request.saved[save.node.id] = proxy

    def keep(self, container: SavedList | SavedDict) -> None:
        """Send back what `container` holds when this trace ends (its proxies are saved then)."""
        self._check_open()
        self._containers.append(container)


class Scan(Tracer):
    """`with model.scan(input):` (NNsight's scan): records as a trace does and sends nothing to run.

    Inside it, values know their shapes and dtypes (from the server's meta-tensor scan of the inputs);
    when the block ends, each saved value is its meta tensor (shape and dtype, no data), or, where no
    shape can be known, missing with the reason. It never joins a session.
    """

    def __init__(self, model: Any, inputs: Any = None, *, runner: Runner,
                 edits: Iterable[Callable[[Tracer], None]] = ()) -> None:
        super().__init__(model, inputs, runner=runner, edits=edits)
        self.session = None
        self._request = Request()
        self.graph = self._request.graph
        self.shapes = Shapes(self.graph, _scans_of(model))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._end_recording(exc_type, "scan"):
            return
        for proxy in self._request.saved.values():
            try:
                proxy.set_value(self.shapes.of(proxy.node.id))
            except ShapeUnknown as e:
                proxy.set_missing(f"its shape is unknown while scanning: {e}")
        _fill_containers(self._containers)


def _scans_of(model: Any) -> Callable[[Any], Any]:
    """The model's scan of a segment's inputs, looked up when a shape is first asked for."""
    return lambda segment: model.scan_document(segment)


def _module_path(key: str) -> str:
    """A module path from NNsight's envoy path (`model.model.layers.0` -> `model.layers.0`)."""
    if key == "model":
        return ""
    return key[len("model."):] if key.startswith("model.") else key


class CacheEntry:
    """One module's cached values: `.output`, and with `include_inputs=True` `.inputs` (args, kwargs)
    and `.input` (the first positional input), as NNsight's cache entries."""

    def __init__(self, path: str, output: Any, inputs: Any = None) -> None:
        self.path = path
        self.saved_output = output
        self.saved_inputs = inputs

    @property
    def ran(self) -> bool:
        return self.saved_output.tracer.is_open or self.saved_output.missing is None

    @property
    def output(self) -> Any:
        return _filled(self.saved_output)

    @property
    def inputs(self) -> Any:
        if self.saved_inputs is None:
            raise AttributeError(f"the cache of {_key_of(self.path)!r} has no inputs: call "
                                 "tracer.cache(include_inputs=True)")
        return _filled(self.saved_inputs)

    @property
    def input(self) -> Any:
        args, kwargs = self.inputs
        return args[0] if args else next(iter(kwargs.values()))

    def __repr__(self) -> str:
        return f"CacheEntry({_key_of(self.path)!r})"


def _key_of(path: str) -> str:
    return f"model.{path}" if path else "model"


class Cache(dict):
    """Cached module values by NNsight's key (`"model.model.layers.0"`); each item is a `CacheEntry`
    with `.output` (and `.inputs`). Attribute access mirrors the model: `cache.model.model.layers[0]`.

    Modules that did not run in the forward pass (e.g. a dropout that attention skips, or everything
    after an early stop) are left out.
    """

    def __init__(self, entries: dict[str, CacheEntry]) -> None:
        super().__init__({_key_of(path): entry for path, entry in entries.items()})

    def _key(self, key: str) -> str:
        """NNsight's key as given, else `key` read as a module path (`"model.layers.0"`, `""`)."""
        return key if dict.__contains__(self, key) else _key_of(key)

    def __getitem__(self, key: str) -> CacheEntry:
        found = self._key(key)
        if not dict.__contains__(self, found):
            sample = ", ".join(list(dict.keys(self))[:3])
            raise KeyError(f"{key!r} is not in this cache: keys are envoy paths such as {sample}, ...")
        entry = super().__getitem__(found)
        if not entry.ran:
            raise KeyError(f"{key!r} did not run in this forward pass, so it has no cached output")
        return entry

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or not dict.__contains__(self, self._key(key)):
            return False
        return super().__getitem__(self._key(key)).ran

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return _CachePath(self, name)

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


class _CachePath:
    """`cache.model.model.layers[0]`: walks keys by attribute and index down to an entry's values."""

    def __init__(self, cache: Cache, key: str) -> None:
        self.cache = cache
        self.key = key

    def __getattr__(self, name: str) -> Any:
        if name in ("output", "inputs", "input") and dict.__contains__(self.cache, self.key):
            return getattr(self.cache[self.key], name)
        return _CachePath(self.cache, f"{self.key}.{name}")

    def __getitem__(self, index: int) -> _CachePath:
        return _CachePath(self.cache, f"{self.key}.{index}")


class Barrier:
    """NNsight's cross-invoke barrier, accepted and needing nothing: `barrier()` does nothing, because
    a farscope graph refers to another invoke's values directly."""

    def __init__(self, participants: int) -> None:
        self.participants = participants

    def __call__(self) -> None:
        return None


class SavedList(list):
    """`farscope.list()` (NNsight's `nnsight.list()` / `list().save()`): a list filled inside a trace
    whose traced items come back as their values when the trace ends (replaced in place)."""

    def save(self) -> SavedList:
        return self

    def append(self, item: Any) -> None:
        super().append(item)
        tracer = tracer_stack.innermost_tracer()
        if isinstance(tracer, Tracer):
            tracer.note_append(self, item)

    def save_items(self) -> None:
        self[:] = [save(item) for item in self]

    def fill_items(self) -> None:
        self[:] = [_filled(item) for item in self]


class SavedDict(dict):
    """`farscope.dict()`: a dict filled inside a trace; its traced values come back as values."""

    def save(self) -> SavedDict:
        return self

    def save_items(self) -> None:
        for key, item in self.items():
            self[key] = save(item)

    def fill_items(self) -> None:
        for key, item in self.items():
            self[key] = _filled(item)


def save(value: Any) -> Any:
    """NNsight's `nnsight.save(value)`: a proxy is saved (returns what `.save()` returns); a list or
    dict becomes one whose traced items come back; anything else comes back as it is."""
    if isinstance(value, Proxy | SavedTensor):
        return value.save()
    tracer = tracer_stack.innermost_tracer()
    if isinstance(value, list | dict) and tracer is not None:
        kept = value if isinstance(value, SavedList | SavedDict) else (
            SavedList(value) if isinstance(value, list) else SavedDict(value))
        tracer.keep(kept)
        return kept
    if isinstance(value, tuple):
        return tuple(save(v) for v in value)
    return value


def _filled(item: Any) -> Any:
    """A saved item after its trace: the SavedTensor (a tensor then), or the non-tensor value itself."""
    if isinstance(item, SavedTensor):
        if not item.has_value:
            return item  # still recording, or never computed (its error says why on use)
        return item.value if not isinstance(item.value, torch.Tensor) else item
    if isinstance(item, tuple):
        return tuple(_filled(v) for v in item)
    return item


def _fill_containers(containers: Iterable[SavedList | SavedDict]) -> None:
    for container in containers:
        container.fill_items()


def _check_input(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.int64)
    if isinstance(value, (str, list)):
        return value
    if hasattr(value, "keys") and "input_ids" in value:  # a tokenizer's BatchEncoding
        return _check_input(value["input_ids"])
    raise TraceError(f"unsupported input of type {type(value).__name__}: pass a string, a list of strings "
                     "or token ids")
