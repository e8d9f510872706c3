"""The executor: runs a validated `Graph` inside a model's forward passes, like an FX interpreter.

A graph is a list of segments (one per trace or generate of a session) run in order over one shared
environment, so values flow between them without leaving the server. Within a segment the executor
hooks only the modules the graph references. Whenever a hook point fires (a module's output on its
n-th call, its inputs, a tensor's gradient during backward), its value becomes available and every
node that can now run does, in recording order (a node's inputs are earlier nodes, so one pass
suffices). Once nothing is left, the forward pass stops early: a graph that only reads layer 3 never
runs layer 4. Values are dropped once every user has run; failures name the node and the user's line.

Conditional blocks (`if` / `else` / `end`): a node inside a block waits until the block's opener has
run; if the block is not taken the node is skipped (counted done, never run, its value absent), so a
hook read in a branch not taken waits for no module.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from farscope.interventions import ops
from farscope.interventions.errors import CancelledError, FarscopeError, RemoteError
from farscope.interventions.graph import Graph, HookPoint, Node, Ref, Segment, iter_refs, map_args

from .cobatch import SharedPass, rebuild
from .config import DEFAULT_MAX_BYTES
from .guard import check_allocation, check_python, check_result, python_size

__all__ = ["Batch", "Executor"]

log = logging.getLogger(__name__)

# Each model's modules by path: walking the tree costs ~2 ms a request on a 30-layer model, and a
# served model's tree does not change after loading. Weak keys: a model unloaded takes its entry along.
_MODULES: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def _modules_of(model: nn.Module) -> dict[str, nn.Module]:
    modules = _MODULES.get(model)
    if modules is None:
        modules = _MODULES[model] = dict(model.named_modules())
    return modules

# Where a node waits to run: a module's hook point on its n-th call, (module path, point, call); a
# module about to run, for a skip, (module path, SKIP, call); a value's gradient, (GRAD, node id, 0).
_Site = tuple[Any, ...]


@dataclass
class Batch:
    """The model's keyword inputs for one forward pass (or generate), and the rows each invoke owns."""

    inputs: dict[str, Any]
    rows: list[tuple[int, int]]  # invoke -> [start, stop)

    @property
    def size(self) -> int:
        return self.rows[-1][1] if self.rows else 0


class _StopForward(Exception):
    """Raised from a hook once nothing later in the forward pass is needed (or a `stop` node ran)."""


@dataclass
class _Frame:
    """The hook point firing now; frames nest (a backward run inside a module's hook)."""

    site: _Site
    value: Any
    rows: list[tuple[int, int]] | None = None  # rows of invokes, when the value spans a batch


@dataclass
class _SegmentState:
    segment: Segment
    batch: Batch
    grads: bool = False  # the segment takes gradients: activations read in it carry autograd history
    calls: dict[tuple[str, str], int] = field(default_factory=dict)
    skips: dict[tuple[str, int], dict[int, Any]] = field(default_factory=dict)


class Executor:
    def __init__(self, model: nn.Module, graph: Graph, batch_for: Callable[[Segment], Batch],
                 *, check_cancelled: Callable[[], None] | None = None,
                 on_log: Callable[[str], None] | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 max_tensor_bytes: int = DEFAULT_MAX_BYTES, shared: SharedPass | None = None) -> None:
        """`shared`: the graph merges several jobs' graphs (cobatch.py), each isolated to its rows."""
        self.on_progress = on_progress
        self.model = model
        self.graph = graph
        self.batch_for = batch_for
        self.check_cancelled = check_cancelled
        self.on_log = on_log or (lambda text: log.info("graph log: %s", text))
        self.max_tensor_bytes = max_tensor_bytes  # the most one value a node computes may take
        self.modules = _modules_of(model)  # read only
        self.env: dict[int, Any] = {}
        self.done: set[int] = set()
        self.pending: list[int] = []
        self.specs = [ops.REGISTRY[n.op] for n in graph.nodes]  # by node id
        self.deps: list[tuple[int, ...]] = [
            tuple(sorted({r.id for r in iter_refs((n.args, n.kwargs))})) for n in graph.nodes
        ]
        self.saved_ids = {n.id for n in graph.nodes if n.op == ops.SAVE}
        # Plain Python values are bounded like tensors (guard.python_size): each node's value when it is
        # made, and arguments that nest earlier values in literals ([%1, %1, ...]) before they are used.
        self.value_sizes: dict[int, int] = {}  # node id -> elements of its non-tensor value, when over 1
        self.nesting = {n.id for n in graph.nodes if _nests_refs((n.args, n.kwargs))}
        # Nodes run when ready, not in recording order, so a value is freed once every node using it
        # has run (not after its last user in recording order, which may run before earlier ones).
        self.uses_left: dict[int, int] = {}
        for deps in self.deps:
            for dep in deps:
                self.uses_left[dep] = self.uses_left.get(dep, 0) + 1
        # Values whose gradient a node reads or replaces: hooked when they are computed.
        self.grad_targets = {n.args[0].id for n in graph.nodes if self.specs[n.id].on_gradient}
        self.grad_rows: dict[int, tuple[int, int] | None] = {}
        # A `.grad` read (or assignment) recorded after a `backward()` belongs to the latest one: with
        # several backward passes (one per invoke), it must not take an earlier pass's gradient.
        self.grad_owner: dict[int, int] = {}
        for segment in graph.segments:
            owner = None
            for n in graph.nodes[segment.start:segment.stop]:
                if n.op == ops.BACKWARD:
                    owner = n.id
                elif self.specs[n.id].on_gradient and owner is not None:
                    self.grad_owner[n.id] = owner
        # Conditional blocks: each node's innermost block opener (if / else), and whether a block runs.
        self.gate = _gates(graph)
        self.taken: dict[int, bool] = {}
        self.skipped: set[int] = set()
        self.frames: list[_Frame] = []
        self.running: set[int] = set()  # nodes under way (a backward node while its gradient hooks run)
        self.bypass = 0  # > 0 while a `call_module` node runs a module outside the forward pass
        self.last_write: Node | None = None
        self.state: _SegmentState | None = None
        self.shared = shared

    # -- running -------------------------------------------------------------------------------

    def run(self) -> dict[int, Any]:
        """Run every segment in order; returns the saved values by node id."""
        for segment in self.graph.segments:
            self._run_segment(segment)
        if self.shared is not None:
            for job in self.shared.check():
                self._evict(job, self.shared.evicted[job])
        return {i: self.env[i] for i in self.saved_ids if i in self.done and i not in self.skipped}

    def _run_segment(self, segment: Segment) -> None:
        nodes = self.graph.nodes[segment.start:segment.stop]
        self.pending = [n.id for n in nodes]
        needs_forward = any(self.specs[n.id].hooked for n in nodes)
        batch = self.batch_for(segment) if needs_forward else Batch({}, [])
        grads = any(n.op == ops.BACKWARD for n in nodes)
        self.state = _SegmentState(segment, batch, grads=grads)
        handles: list[Any] = []
        restore: list[tuple[nn.Module, Any]] = []
        try:
            with torch.enable_grad() if grads else torch.no_grad():
                self._run_ready()
                if self.pending and needs_forward:
                    handles, restore = self._install_hooks(nodes)
                    if self.on_progress is not None:
                        handles.append(self.model.register_forward_hook(self._progress_hook(segment)))
                    if segment.mode == "generate":
                        self._generate(segment)
                    else:
                        self.model(**batch.inputs)
        except _StopForward:
            pass
        except FarscopeError:
            raise
        except Exception as e:
            after = f" (after {self.last_write} changed a module's value)" if self.last_write else ""
            raise RemoteError(f"the model's forward pass failed{after}: {type(e).__name__}: {e}") from e
        finally:
            for handle in handles:
                handle.remove()
            for module, forward in restore:
                module.forward = forward
            self.frames.clear()
        self._drop_optional()
        if self.shared is not None:  # a job with nodes that never ran fails alone, not the whole pass
            for nid in self.pending:
                self._evict(self.shared.job_of(nid), "some of its nodes never ran")
        if self.pending and segment.mode == "trace":
            raise self._never_ran(self.graph.nodes[self.pending[0]])
        # Under generate, nodes of steps after the last one (generation stopped early) never run;
        # their saved values are simply absent, which the client reports when asked for them.

    def _drop_optional(self) -> None:
        """Forget optional reads of modules that never ran, and what depends on them."""
        dropped: set[int] = set()
        for nid in self.pending:
            node = self.graph.nodes[nid]
            if (node.op == ops.READ and node.kwargs.get("optional")) or dropped.intersection(self.deps[nid]):
                dropped.add(nid)
        self.pending = [n for n in self.pending if n not in dropped]

    def _generate(self, segment: Segment) -> None:
        batch = self.state.batch
        tokenizer_pad = batch.inputs.get("pad_token_id")
        inputs = {k: v for k, v in batch.inputs.items() if k != "pad_token_id"}
        options = dict(segment.options)
        if tokenizer_pad is not None:
            options.setdefault("pad_token_id", tokenizer_pad)
        sequences = self.model.generate(**inputs, **options)
        self._event("", "result", sequences)

    def _run_ready(self) -> None:
        # Re-entrant: a node may run a backward pass whose gradient hooks run nodes in turn.
        for nid in list(self.pending):
            if nid in self.done or nid in self.running or self._evicted(nid):
                continue
            node = self.graph.nodes[nid]
            gate = self.gate.get(nid)
            if gate is not None and gate not in self.done:
                continue  # its block's condition is not decided yet
            if gate is not None and not self.taken.get(gate, False):
                self._skip_node(node)
                continue
            if self._ready(node):
                if self.shared is None:
                    self._execute(node)
                    continue
                try:
                    self._execute(node)
                except CancelledError:
                    raise
                except FarscopeError as e:  # its job leaves the pass and runs again alone
                    self._evict(self.shared.job_of(nid), f"a node failed: {e}")
        self.pending = [n for n in self.pending if n not in self.done and not self._evicted(n)]

    def _evicted(self, nid: int) -> bool:
        return self.shared is not None and self.shared.job_of(nid) in self.shared.evicted

    def _evict(self, job: int, reason: str) -> None:
        """Job `job` of a shared pass leaves it: its remaining nodes do not run; it runs again alone."""
        self.shared.evict(job, reason)
        nodes = self.shared.nodes_of(job)
        self.pending = [n for n in self.pending if n not in nodes]

    def _skip_node(self, node: Node) -> None:
        """A node of a block not taken: done without running, and no longer holding its inputs."""
        self.skipped.add(node.id)
        self.done.add(node.id)
        self._release(node)

    def _release(self, node: Node) -> None:
        for dep in self.deps[node.id]:
            self.uses_left[dep] -= 1
            if self.uses_left[dep] == 0 and dep not in self.saved_ids:
                self.env.pop(dep, None)

    def _ready(self, node: Node) -> bool:
        if any(dep not in self.done for dep in self.deps[node.id]):
            return False
        skipped = [f"%{dep}" for dep in self.deps[node.id] if dep in self.skipped]
        if skipped:
            raise RemoteError(f"this node uses {', '.join(skipped)}, recorded in a conditional block that "
                              "was not taken, so it has no value", node=node.format(), node_id=node.id,
                              where=node.where)
        spec = self.specs[node.id]
        if spec.hooked:
            hook: HookPoint = node.args[0]
            return self._site() == (hook.module, _point(node), node.kwargs.get("call", 0))
        if spec.on_gradient:
            owner = self.grad_owner.get(node.id)
            return self._site() == (ops.GRAD, node.args[0].id, 0) and (owner is None or owner in self.running)
        if node.op == ops.STOP:
            start = self.state.segment.start
            return all(n in self.done for n in range(start, node.id))
        return True

    def _site(self) -> _Site | None:
        return self.frames[-1].site if self.frames else None

    def _execute(self, node: Node) -> None:
        self.running.add(node.id)
        try:
            if node.id in self.nesting:
                python_size((node.args, node.kwargs), f"the arguments of {node.op}", self.value_sizes)
            value = self._compute(node)
            if value is not None and not isinstance(value, torch.Tensor):
                size = python_size(value, f"the value of {node.op}")
                if size > 1:
                    self.value_sizes[node.id] = size
            if node.id in self.grad_targets:
                self._hook_gradient(node, value)
        except (FarscopeError, _StopForward) as e:
            if isinstance(e, FarscopeError) and e.node_id is None:  # a limit or cancel: name the node
                e.node, e.node_id, e.where = node.format(), node.id, node.where
            raise
        except Exception as e:
            raise RemoteError(f"{type(e).__name__}: {e}", node=node.format(), node_id=node.id,
                              where=node.where) from e
        finally:
            self.running.discard(node.id)
        self.env[node.id] = value
        self.done.add(node.id)
        self._release(node)

    # -- one method per op: the special ops by name (_SPECIAL, below), every other op through _call --

    def _compute(self, node: Node) -> Any:
        special = self._SPECIAL.get(node.op)
        return special(self, node) if special is not None else self._call(node)

    def _call(self, node: Node) -> Any:
        spec = self.specs[node.id]
        assert spec.fn is not None, spec.name
        args, kwargs = self._resolve(node.args), self._resolve(node.kwargs)
        # Every cost bounded before it is spent (guard.py): Python values, then tensor bytes.
        check_python(spec, args, kwargs)
        check_allocation(spec, args, kwargs, self.max_tensor_bytes)
        value = spec.fn(*args, **kwargs)
        check_result(spec, value, args, kwargs, self.max_tensor_bytes)
        return value

    def _read(self, node: Node) -> Any:
        frame = self.frames[-1]
        if node.id in self.grad_targets or self.state.grads:
            if isinstance(frame.value, torch.Tensor):
                frame.value = _grad_enabled(frame.value)
            elif type(frame.value) is tuple:  # e.g. an attention module's (output, weights)
                frame.value = tuple(_grad_enabled(v) if isinstance(v, torch.Tensor) else v for v in frame.value)
        invoke = node.kwargs["invoke"]
        if frame.rows is None or invoke is None:
            return frame.value
        if self.shared is not None:  # its invoke's rows, and its own copy of what is not per-row
            return self.shared.hand_out(self.shared.job_of(node.id), frame.value, invoke, frame.rows)
        return rebuild(frame.value, lambda v: _narrow(v, frame.rows[invoke], frame.rows[-1][1]))

    def _write(self, node: Node) -> None:
        frame = self.frames[-1]
        value = self._write_rows(frame.value, node.kwargs["invoke"], self._resolve(node.args[1]))
        if self.shared is not None:
            self.shared.replacing(self.shared.job_of(node.id), frame.value)
        frame.value = value
        self.last_write = node

    def _skip(self, node: Node) -> None:
        # Taken by the module's replaced forward (_skipping_forward), which runs right after.
        hook: HookPoint = node.args[0]
        key = (hook.module, node.kwargs.get("call", 0))
        self.state.skips.setdefault(key, {})[node.kwargs["invoke"]] = self._resolve(node.args[1])

    def _grad(self, node: Node) -> Any:
        return _narrow(self.frames[-1].value, self.grad_rows.get(node.args[0].id))

    def _set_grad(self, node: Node) -> None:
        frame = self.frames[-1]
        rows = self.grad_rows.get(node.args[0].id)
        new = self._resolve(node.args[1])
        if rows is None:
            frame.value = _conform(frame.value, new)
        else:
            out = frame.value.clone()
            out[rows[0]:rows[1]] = _conform(out[rows[0]:rows[1]], new)
            frame.value = out

    def _backward(self, node: Node) -> None:
        target = self._resolve(node.args[0])
        if not isinstance(target, torch.Tensor) or not target.requires_grad:
            raise ValueError("backward() needs a value computed from the model's activations inside "
                             "this trace (read .output/.input of a module and compute from it)")
        target.backward(**self._resolve(node.kwargs))

    def _call_module(self, node: Node) -> Any:
        module = self.modules[node.args[0].module]
        args, kwargs = self._resolve(node.args[1:]), self._resolve(node.kwargs)
        self.bypass += 1
        try:
            return module(*args, **kwargs)
        finally:
            self.bypass -= 1

    def _stop(self, node: Node) -> None:
        # Everything recorded before it has run (see _ready); nothing after it will.
        self.done.add(node.id)
        self.pending = []
        raise _StopForward

    def _log(self, node: Node) -> None:
        self.on_log(" ".join(_show(v) for v in self._resolve(node.args)))

    def _if(self, node: Node) -> bool:
        condition = self._resolve(node.args[0])
        if isinstance(condition, torch.Tensor):
            if condition.numel() != 1:
                raise ValueError(f"a condition must be a single value; this one is a tensor of shape "
                                 f"{list(condition.shape)} (reduce it first: .all(), .any(), .item())")
            taken = bool(condition.item())
        elif isinstance(condition, (bool, int, float)) or condition is None:
            taken = bool(condition)
        else:
            raise TypeError(f"a condition must be a bool, a number or a one-element tensor, not a "
                            f"{type(condition).__name__}")
        self.taken[node.id] = taken
        return taken

    def _else(self, node: Node) -> bool:
        # Reached only when its `if` ran (both sit in the same enclosing block).
        taken = not self.taken[node.args[0].id]
        self.taken[node.id] = taken
        return taken

    def _end(self, node: Node) -> None:
        return None

    def _fail(self, node: Node) -> None:
        raise RemoteError(node.args[0], node=node.format(), node_id=node.id, where=node.where)

    _SPECIAL: ClassVar[dict[str, Callable[[Executor, Node], Any]]] = {
        ops.READ: _read, ops.WRITE: _write, ops.SKIP: _skip, ops.GRAD: _grad, ops.SET_GRAD: _set_grad,
        ops.BACKWARD: _backward, ops.CALL_MODULE: _call_module, ops.STOP: _stop, ops.LOG: _log,
        ops.IF: _if, ops.ELSE: _else, ops.END: _end, ops.FAIL: _fail,
    }

    def _hook_gradient(self, node: Node, value: Any) -> None:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f".grad needs a floating-point tensor, got {type(value).__name__}")
        target = value
        if node.op == ops.READ and self.frames and self.frames[-1].rows is not None:
            # A read narrowed to an invoke's rows is a view the model never uses: hook the whole value
            # and hand out the invoke's rows of its gradient.
            frame = self.frames[-1]
            target = frame.value
            self.grad_rows[node.id] = frame.rows[node.kwargs["invoke"]]
        if not target.requires_grad:
            raise ValueError("this value does not depend on the model's activations, so it has no gradient")
        nid = node.id
        target.register_hook(lambda grad: self._on_gradient(nid, grad))

    def _on_gradient(self, nid: int, grad: torch.Tensor) -> Any:
        # Autograd runs hooks with grad mode off; nodes that become ready here may compute from
        # activations for a later backward() (a second one, with retain_graph), so they need it on.
        with torch.enable_grad():
            return self._fire((ops.GRAD, nid, 0), grad.clone(), None)

    def _resolve(self, args: Any) -> Any:
        return map_args(args, lambda a: self.env[a.id] if isinstance(a, Ref) else a)

    def _never_ran(self, node: Node) -> RemoteError:
        spec = self.specs[node.id]
        gate = self.gate.get(node.id)
        if gate is not None and gate not in self.done:
            msg = (f"this node sits in the conditional block of %{gate}, whose condition was not decided in "
                   "time: it needs values the forward pass computes only after this node's module ran")
        elif spec.hooked:
            hook: HookPoint = node.args[0]
            call = node.kwargs.get("call", 0)
            which = f" (call {call})" if call else ""
            msg = (f"{hook}{which} was never reached: module {hook.module or 'model'!r} did not run in this "
                   "forward pass, or ran before a value this node needs")
        elif spec.on_gradient:
            msg = "this gradient was never computed: no backward() reached the value it belongs to"
        else:
            missing = [f"%{d}" for d in self.deps[node.id] if d not in self.done]
            msg = f"this node never ran: it needs {', '.join(missing)}, which never ran"
        return RemoteError(msg, node=node.format(), node_id=node.id, where=node.where)

    # -- hooks ---------------------------------------------------------------------------------

    def _install_hooks(self, nodes: list[Node]) -> tuple[list[Any], list[tuple[nn.Module, Any]]]:
        points: dict[str, set[str]] = {}
        for node in nodes:
            if self.specs[node.id].hooked:
                points.setdefault(node.args[0].module, set()).add(_point(node))
        handles, restore = [], []
        for path, wanted in points.items():
            module = self.modules[path]
            if wanted & {"input", "inputs", ops.SKIP}:
                handles.append(module.register_forward_pre_hook(self._pre_hook(path, wanted), with_kwargs=True))
            if "output" in wanted:
                handles.append(module.register_forward_hook(self._post_hook(path), with_kwargs=True))
            if ops.SKIP in wanted:
                restore.append((module, module.forward))
                module.forward = self._skipping_forward(path, module.forward)
        return handles, restore

    def _progress_hook(self, segment: Segment) -> Callable[..., Any]:
        total = int(segment.options.get("max_new_tokens", 1))
        steps = [0]

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.bypass:
                return
            steps[0] += 1
            self.on_progress(steps[0], total)
            if self.check_cancelled is not None:  # generation steps end here: stop between them too
                self.check_cancelled()
        return hook

    def _pre_hook(self, path: str, wanted: set[str]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if "inputs" in wanted:
                args, kwargs = self._event(path, "inputs", (args, kwargs))
            if "input" in wanted:
                if args:
                    args = (self._event(path, "input", args[0]), *args[1:])
                elif kwargs:
                    first = next(iter(kwargs))
                    kwargs = {**kwargs, first: self._event(path, "input", kwargs[first])}
            if ops.SKIP in wanted:  # after the inputs: a skip's value may be computed from them
                self._event(path, ops.SKIP, None)
            return args, kwargs
        return hook

    def _post_hook(self, path: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return self._event(path, "output", output)
        return hook

    def _skipping_forward(self, path: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        def skipping(*args: Any, **kwargs: Any) -> Any:
            if self.bypass:
                return forward(*args, **kwargs)
            call = self.state.calls.get((path, ops.SKIP), 1) - 1  # the pre-hook counted this call
            values = self.state.skips.pop((path, call), None)
            if not values:
                return forward(*args, **kwargs)
            rows = self.state.batch.rows
            if len(values) == len(rows):  # every invoke skips: the module does not run at all
                if len(rows) == 1:
                    return values[0]
                return torch.cat([values[i] for i in range(len(rows))], dim=0)
            output = forward(*args, **kwargs)
            for invoke, value in values.items():
                output = self._write_rows(output, invoke, value)
            return output
        return skipping

    def _event(self, path: str, point: str, value: Any) -> Any:
        """Module `path` reached `point`: run what became ready; returns the value to pass on."""
        if self.bypass:
            return value
        if self.check_cancelled is not None:
            self.check_cancelled()
        key = (path, point)
        call = self.state.calls.get(key, 0)
        self.state.calls[key] = call + 1
        rows = self.state.batch.rows if len(self.state.batch.rows) > 1 else None
        value = self._fire((path, point, call), value, rows)
        if not self.pending:
            raise _StopForward
        return value

    def _fire(self, site: _Site, value: Any, rows: list[tuple[int, int]] | None) -> Any:
        self.frames.append(_Frame(site, value, rows))
        try:
            self._run_ready()
            return self.frames[-1].value
        finally:
            self.frames.pop()

    # -- invoke rows ---------------------------------------------------------------------------

    def _write_rows(self, current: Any, invoke: int, new: Any) -> Any:
        rows = self.state.batch.rows
        if len(rows) <= 1:
            return _conform(current, new)
        start, stop = rows[invoke]
        if isinstance(current, torch.Tensor):
            if self.shared is not None and (current.dim() == 0 or current.shape[0] != rows[-1][1]):
                # Alone, the write would replace the value for its whole pass: here, for every job's.
                raise ValueError(f"cannot write, in a shared pass, into a value without a batch dimension "
                                 f"(shape {list(current.shape)})")
            out = current.clone()
            out[start:stop] = _conform(current[start:stop], new)
            return out
        if isinstance(current, tuple) and isinstance(new, tuple) and len(current) == len(new):
            return tuple(self._write_rows(c, invoke, n) for c, n in zip(current, new, strict=True))
        raise TypeError(f"cannot write a {type(new).__name__} into rows of a {type(current).__name__}")


def _gates(graph: Graph) -> dict[int, int]:
    """Each node inside a conditional block -> the innermost block's opener (an `if` or `else` node).

    The validator has checked that blocks nest within each segment; an opener and its `end` belong to
    the enclosing block, so they are gated by it, not by themselves.
    """
    gates: dict[int, int] = {}
    for segment in graph.segments:
        open_blocks: list[int] = []
        for node in graph.nodes[segment.start:segment.stop]:
            spec = ops.REGISTRY[node.op]
            if spec.closes_block and open_blocks:
                open_blocks.pop()
            if open_blocks:
                gates[node.id] = open_blocks[-1]
            if spec.opens_block:
                open_blocks.append(node.id)
    return gates


def _nests_refs(args: Any) -> bool:
    """Whether a node's arguments hold a reference inside a literal list, tuple or dict."""
    def inside(value: Any, nested: bool) -> bool:
        if isinstance(value, Ref):
            return nested
        if isinstance(value, (list, tuple)):
            return any(inside(v, True) for v in value)
        if isinstance(value, dict):
            return any(inside(v, True) for v in value.values())
        return False
    return any(inside(a, False) for a in args[0]) or any(inside(v, False) for v in args[1].values())


def _point(node: Node) -> str:
    """The point a hooked node waits at: its hook point, or for a skip the module's start."""
    return ops.SKIP if node.op == ops.SKIP else node.args[0].point


def _narrow(value: Any, rows: tuple[int, int] | None, size: int | None = None) -> Any:
    """The rows of an invoke (a view, so edits land); tensors without a batch dimension pass whole."""
    if rows is None or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if size is not None and value.shape[0] != size:
        return value
    return value.narrow(0, rows[0], rows[1] - rows[0])


def _grad_enabled(value: torch.Tensor) -> torch.Tensor:
    """`value`, or a copy that carries autograd history, so gradients can flow back to it."""
    if value.requires_grad or not value.is_floating_point():
        return value
    # A clone of a leaf that requires grad: not itself a leaf, so in-place edits stay legal.
    return value.detach().requires_grad_(True).clone()


def _conform(current: Any, new: Any) -> Any:
    """`new` shaped and typed like the tensor it replaces, or a clear error saying why not."""
    if isinstance(current, torch.Tensor):
        if not isinstance(new, torch.Tensor):
            new = torch.as_tensor(new)
        if new.shape != current.shape:
            try:
                new = torch.broadcast_to(new, current.shape)
            except RuntimeError:
                raise ValueError(f"shape mismatch: cannot replace a value of shape {list(current.shape)} "
                                 f"with one of shape {list(new.shape)}") from None
        return new.to(dtype=current.dtype, device=current.device)
    return new


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        with torch.no_grad():
            return repr(value.detach())
    return str(value)
