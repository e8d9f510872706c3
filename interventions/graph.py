"""The intervention graph: an ordered list of nodes, like a torch.fx graph.

A node is ``id``, ``op`` (a name from `ops.REGISTRY`), ``args``, ``kwargs`` and ``where`` (the user's
``file:line`` that recorded it). Arguments nest lists, tuples, dicts and slices of:

- literals: None, bool, int, float, str, `Ellipsis`, `torch.dtype`;
- `Ref(id)`: the value of an earlier node;
- `HookPoint(module, point)`: a module's ``output`` / ``input`` / ``inputs`` (only as `read`/`write`'s
  first argument);
- `torch.Tensor`: a constant travelling with the request.

A graph prints one node a line, ``%5 = add(%3, %4)  # experiment.py:12``; errors quote those lines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "IR_VERSION", "Ref", "HookPoint", "Node", "Graph", "map_args", "iter_refs", "format_arg", "to_document",
]

# Bumped whenever a graph's meaning changes in a way an older executor would misread.
IR_VERSION = 1


@dataclass(frozen=True, slots=True)
class Ref:
    """The value of node `id`."""

    id: int

    def __repr__(self) -> str:
        return f"%{self.id}"


@dataclass(frozen=True, slots=True)
class HookPoint:
    """A module's hook point: `module` is its `named_modules()` path ("" is the root)."""

    module: str
    point: str

    def __repr__(self) -> str:
        return f"{self.module or 'model'}.{self.point}"


@dataclass(slots=True)
class Node:
    id: int
    op: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    where: str = ""

    def format(self) -> str:
        parts = [format_arg(a) for a in self.args]
        parts += [f"{k}={format_arg(v)}" for k, v in self.kwargs.items()]
        return f"%{self.id} = {self.op}({', '.join(parts)})"

    def __str__(self) -> str:
        return f"{self.format()}  # {self.where}" if self.where else self.format()


@dataclass
class Graph:
    """What one trace asks for: the inputs of each invoke and the nodes, in recording order."""

    nodes: list[Node] = field(default_factory=list)
    invokes: list[Any] = field(default_factory=list)
    version: int = IR_VERSION

    def add(self, op: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
            where: str = "") -> Node:
        node = Node(len(self.nodes), op, tuple(args), dict(kwargs or {}), where)
        self.nodes.append(node)
        return node

    def __str__(self) -> str:
        head = [f"graph v{self.version}, {len(self.invokes)} invoke(s):"]
        return "\n".join(head + [f"  {node}" for node in self.nodes])


def map_args(value: Any, fn: Callable[[Any], Any]) -> Any:
    """Rebuild a nested argument, passing every leaf that is not a container through `fn`."""
    if isinstance(value, list):
        return [map_args(v, fn) for v in value]
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(map_args(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_args(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(map_args(value.start, fn), map_args(value.stop, fn), map_args(value.step, fn))
    return fn(value)


def iter_refs(value: Any) -> Iterator[Ref]:
    """Every `Ref` inside a nested argument."""
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from iter_refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_refs(v)
    elif isinstance(value, slice):
        for v in (value.start, value.stop, value.step):
            yield from iter_refs(v)


def format_arg(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor<{str(value.dtype).removeprefix('torch.')}{list(value.shape)}>"
    if isinstance(value, slice):
        parts = ["" if p is None else format_arg(p) for p in (value.start, value.stop, value.step)]
        text = f"{parts[0]}:{parts[1]}"
        return text + (f":{parts[2]}" if value.step is not None else "")
    if value is Ellipsis:
        return "..."
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        inner = ", ".join(format_arg(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_arg(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {format_arg(v)}" for k, v in value.items()) + "}"
    return repr(value)


def to_document(graph: Graph) -> dict[str, Any]:
    """The graph as the plain structure the codec sends: node ids are positions in `nodes`."""
    return {
        "version": graph.version,
        "invokes": list(graph.invokes),
        "nodes": [[n.op, tuple(n.args), dict(n.kwargs), n.where] for n in graph.nodes],
    }
