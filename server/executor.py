"""The executor: runs a validated `Graph` inside one forward pass of a model, like an FX interpreter.

It hooks only the modules the graph references. When a module fires, its hook point's value becomes
available and every node that can now run does, in recording order (each node's inputs are earlier
nodes, so one pass suffices). A `write` node replaces the value the module passes on. Once no node is
left, the forward pass stops early: a graph that only reads layer 3 never runs layer 4. Values are
dropped after their last use; failures are wrapped with the node and the user's line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from farscope.interventions import ops
from farscope.interventions.errors import FarscopeError, RemoteError
from farscope.interventions.graph import Graph, HookPoint, Node, Ref, iter_refs, map_args

from .guard import check_allocation

__all__ = ["Batch", "Executor"]

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """The model's keyword inputs for one forward pass, and the rows each invoke owns."""

    inputs: dict[str, torch.Tensor]
    rows: list[tuple[int, int]]  # invoke -> [start, stop)

    @property
    def size(self) -> int:
        return self.rows[-1][1] if self.rows else 0


class _StopForward(Exception):
    """Raised from a hook once nothing later in the forward pass is needed."""


class Executor:
    def __init__(self, model: nn.Module, graph: Graph, batch: Batch,
                 *, check_cancelled: Callable[[], None] | None = None,
                 max_tensor_bytes: int = 4 * 2**30) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.model = model
        self.graph = graph
        self.batch = batch
        self.check_cancelled = check_cancelled
        self.env: dict[int, Any] = {}
        self.done: set[int] = set()
        self.pending: list[int] = [n.id for n in graph.nodes]
        self.deps: list[tuple[int, ...]] = [
            tuple(sorted({r.id for r in iter_refs((n.args, n.kwargs))})) for n in graph.nodes
        ]
        self.saved_ids = {n.id for n in graph.nodes if n.op == "save"}
        # Nodes run when ready, not in recording order, so a value is freed once every node using it
        # has run (not after its last user in recording order, which may run before earlier ones).
        self.uses_left: dict[int, int] = {}
        for deps in self.deps:
            for dep in deps:
                self.uses_left[dep] = self.uses_left.get(dep, 0) + 1
        self.site: tuple[str, str] | None = None  # the hook point firing now
        self.site_value: Any = None
        self.last_write: Node | None = None
        self.single_invoke = len(batch.rows) <= 1

    # -- running -------------------------------------------------------------------------------

    def run(self) -> dict[int, Any]:
        """Run the graph; returns the saved values by node id."""
        self._run_ready()
        handles = self._install_hooks() if self.pending else []
        try:
            if self.pending:
                with torch.no_grad():
                    self.model(**self.batch.inputs)
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
        if self.pending:
            raise self._never_ran(self.graph.nodes[self.pending[0]])
        return {i: self.env[i] for i in self.saved_ids}

    def _run_ready(self) -> None:
        still: list[int] = []
        for nid in self.pending:
            node = self.graph.nodes[nid]
            if not self._ready(node):
                still.append(nid)
                continue
            self._execute(node)
        self.pending = still

    def _ready(self, node: Node) -> bool:
        if any(dep not in self.done for dep in self.deps[node.id]):
            return False
        if node.op in ("read", "write"):
            hook: HookPoint = node.args[0]
            return self.site == (hook.module, hook.point)
        return True

    def _execute(self, node: Node) -> None:
        try:
            if node.op == "read":
                value = self._rows(self.site_value, node.kwargs["invoke"])
            elif node.op == "write":
                new = self._resolve(node.args[1])
                self.site_value = self._write_rows(self.site_value, node.kwargs["invoke"], new)
                self.last_write = node
                value = None
            else:
                fn = ops.REGISTRY[node.op].fn
                assert fn is not None
                args, kwargs = self._resolve(node.args), self._resolve(node.kwargs)
                check_allocation(node.op, args, kwargs, self.max_tensor_bytes)
                value = fn(*args, **kwargs)
        except FarscopeError as e:
            if e.node_id is None:  # a limit or cancel hit while running this node: name it
                e.node, e.node_id, e.where = node.format(), node.id, node.where
            raise
        except Exception as e:
            raise RemoteError(f"{type(e).__name__}: {e}", node=node.format(), node_id=node.id,
                              where=node.where) from e
        self.env[node.id] = value
        self.done.add(node.id)
        for dep in self.deps[node.id]:
            self.uses_left[dep] -= 1
            if self.uses_left[dep] == 0 and dep not in self.saved_ids:
                self.env.pop(dep, None)

    def _resolve(self, args: Any) -> Any:
        return map_args(args, lambda a: self.env[a.id] if isinstance(a, Ref) else a)

    def _never_ran(self, node: Node) -> RemoteError:
        if node.op in ("read", "write"):
            hook: HookPoint = node.args[0]
            msg = (f"{hook} was never reached: module {hook.module or 'model'!r} did not run in this "
                   "forward pass, or ran before a value this node needs")
        else:
            missing = [f"%{d}" for d in self.deps[node.id] if d not in self.done]
            msg = f"this node never ran: it needs {', '.join(missing)}, which never ran"
        return RemoteError(msg, node=node.format(), node_id=node.id, where=node.where)

    # -- hooks ---------------------------------------------------------------------------------

    def _install_hooks(self) -> list[Any]:
        points: dict[str, set[str]] = {}
        for node in self.graph.nodes:
            if node.op in ("read", "write"):
                hook: HookPoint = node.args[0]
                points.setdefault(hook.module, set()).add(hook.point)
        modules = dict(self.model.named_modules())
        handles = []
        for path, wanted in points.items():
            module = modules[path]
            if wanted & {"input", "inputs"}:
                handles.append(module.register_forward_pre_hook(self._pre_hook(path, wanted),
                                                                with_kwargs=True))
            if "output" in wanted:
                handles.append(module.register_forward_hook(self._post_hook(path), with_kwargs=True))
        return handles

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
            return args, kwargs
        return hook

    def _post_hook(self, path: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return self._event(path, "output", output)
        return hook

    def _event(self, path: str, point: str, value: Any) -> Any:
        if self.check_cancelled is not None:
            self.check_cancelled()
        self.site, self.site_value = (path, point), value
        try:
            self._run_ready()
            value = self.site_value
        finally:
            self.site, self.site_value = None, None
        if not self.pending:
            raise _StopForward
        return value

    # -- invoke rows ---------------------------------------------------------------------------

    def _rows(self, value: Any, invoke: int) -> Any:
        """The part of a hook point's value that belongs to one invoke (a view, so edits land)."""
        if self.single_invoke:
            return value
        start, stop = self.batch.rows[invoke]
        size = self.batch.size

        def narrow(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size:
                return v.narrow(0, start, stop - start)
            return v
        return map_args(value, narrow)

    def _write_rows(self, current: Any, invoke: int, new: Any) -> Any:
        if self.single_invoke:
            return _conform(current, new)
        start, stop = self.batch.rows[invoke]
        if isinstance(current, torch.Tensor):
            out = current.clone()
            out[start:stop] = _conform(current[start:stop], new)
            return out
        if isinstance(current, tuple) and isinstance(new, tuple) and len(current) == len(new):
            return tuple(self._write_rows(c, invoke, n) for c, n in zip(current, new, strict=True))
        raise TypeError(f"cannot write a {type(new).__name__} into rows of a {type(current).__name__}")


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
