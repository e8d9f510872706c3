"""The intervention graph: an ordered list of nodes, like a torch.fx graph.

A node is ``id``, ``op`` (a name from `ops.REGISTRY`), ``args``, ``kwargs`` and ``where`` (the user's
``file:line`` that recorded it). Arguments nest lists, tuples, dicts and slices of:

- literals: None, bool, int, float, str, `Ellipsis`, `torch.dtype`;
- `Ref(id)`: the value of an earlier node;
- `HookPoint(module, point)`: a module's ``output`` / ``input`` / ``inputs`` (the root's ``result`` under
  generate; ``forward``, a module to call), only as the first argument of an op whose
  `OpSpec.hook_points` name that point;
- `torch.Tensor`: a constant travelling with the request.

Control flow is data too: ``%5 = if(%4)`` opens a block of the nodes recorded after it, run only when
%4 is true on the server; ``%9 = end(%5)`` closes it; ``%10 = else(%5)`` ... ``%12 = end(%10)`` right
after is the block run when it was false. Blocks nest; a node inside a block that is not taken is
skipped, never run.

A graph prints one node a line, ``%5 = add(%3, %4)  # experiment.py:12``; errors quote those lines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "IR_VERSION", "MODES", "Ref", "HookPoint", "Node", "Segment", "Graph", "map_args", "iter_refs", "format_arg",
    "to_document", "VERSION", "TRACES", "INVOKES", "NODES", "MODE", "OPTIONS", "SEGMENT_KEYS",
]

# Bumped whenever a graph's meaning changes in a way an older executor would misread. Version 2 added
# the conditional blocks (ops.IF / ops.ELSE / ops.END): an older executor would run both branches.
IR_VERSION = 2

# The keys of a graph document (see `to_document`); the validator reads by the same names.
VERSION = "version"
TRACES = "traces"
INVOKES = "invokes"
NODES = "nodes"
MODE = "mode"
OPTIONS = "options"
SEGMENT_KEYS = (INVOKES, NODES, MODE, OPTIONS)  # the keys of one trace (segment)


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


MODES = ("trace", "generate")


@dataclass
class Segment:
    """One forward pass (`trace`) or one `generate` call of a request, over nodes [start, stop)."""

    mode: str = "trace"
    invokes: list[Any] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # generation keywords
    start: int = 0
    stop: int = 0


class Graph:
    """What one request asks for: the nodes in recording order, split into segments.

    A plain trace is one segment. A session holds several; node ids run across all of them, so a
    later segment's nodes can use values of earlier segments without those leaving the server.
    """

    def __init__(self, nodes: list[Node] | None = None, invokes: list[Any] | None = None,
                 version: int = IR_VERSION, segments: list[Segment] | None = None) -> None:
        self.nodes: list[Node] = list(nodes or [])
        self.version = version
        self.segments: list[Segment] = (
            segments if segments is not None else [Segment(invokes=list(invokes or []), stop=len(self.nodes))])

    @property
    def invokes(self) -> list[Any]:
        """The inputs of the (last) segment."""
        return self.segments[-1].invokes

    def begin(self, mode: str = "trace", options: dict[str, Any] | None = None) -> Segment:
        """Start a new segment (the next trace of a session), unless the current one is still empty."""
        last = self.segments[-1]
        if last.start == last.stop == len(self.nodes) and not last.invokes:
            last.mode, last.options = mode, dict(options or {})
            return last
        segment = Segment(mode, [], dict(options or {}), len(self.nodes), len(self.nodes))
        self.segments.append(segment)
        return segment

    def add(self, op: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
            where: str = "") -> Node:
        node = Node(len(self.nodes), op, tuple(args), dict(kwargs or {}), where)
        self.nodes.append(node)
        self.segments[-1].stop = len(self.nodes)
        return node

    def __str__(self) -> str:
        lines = [f"graph v{self.version}:"]
        for segment in self.segments:
            lines.append(f"  {segment.mode} of {len(segment.invokes)} invoke(s) {segment.options or ''}".rstrip())
            lines += [f"    {node}" for node in self.nodes[segment.start:segment.stop]]
        return "\n".join(lines)


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


def _segment_document(graph: Graph, segment: Segment) -> dict[str, Any]:
    document: dict[str, Any] = {
        INVOKES: list(segment.invokes),
        NODES: [[n.op, tuple(n.args), dict(n.kwargs), n.where] for n in graph.nodes[segment.start:segment.stop]],
    }
    if segment.mode != "trace":
        document[MODE] = segment.mode
    if segment.options:
        document[OPTIONS] = dict(segment.options)
    return document


def to_document(graph: Graph) -> dict[str, Any]:
    """The graph as the plain structure the codec sends.

    One segment: ``{version, invokes, nodes[, mode, options]}``. Several (a session):
    ``{version, traces: [{invokes, nodes[, mode, options]}, ...]}``. Node ids are positions, counted
    across all segments.
    """
    if len(graph.segments) == 1:
        return {VERSION: graph.version, **_segment_document(graph, graph.segments[0])}
    return {VERSION: graph.version, TRACES: [_segment_document(graph, s) for s in graph.segments]}
