"""Shapes while recording: the meta value (shape and dtype, no data) of each recorded node.

NNsight scripts read shapes inside a trace (`B, S, H = x.shape`, `x.view(B, S, heads, hd)`). A
farscope value exists only on the server, so its shape comes from two places, both data:

- the server's scan (one `Scan` call per set of inputs, cached): every module's output / input /
  inputs as meta tensors, for the batch the trace's invokes make; a read hook point takes its
  invoke's rows of it, as the executor does;
- the recorded ops themselves, run here on those meta tensors (torch on the client, nothing sent).

Nothing is computed until a shape is asked for; then the node and the nodes it depends on are
evaluated once, in recording order. A node whose value cannot be known this way (a module called out
of order, a later generation step, an op meta tensors cannot do, such as `.item()`) is *unknown*, with
the reason, which `ShapeUnknown` carries.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from farscope.interventions import ops
from farscope.interventions.codec import Record
from farscope.interventions.errors import FarscopeError, TraceError
from farscope.interventions.graph import Graph, HookPoint, Ref, Segment, iter_refs, map_args

__all__ = ["ShapeUnknown", "Shapes", "meta_tree", "ScanDocument"]

ROWS, MODULES, LENGTH = "rows", "modules", "length"  # the scan document's keys (server/scan.py)
TENSOR_META = "TensorMeta"  # the record standing for a tensor in a scan document

# A scan, fetched for a segment's invokes: {rows, length, modules: {path: {point: meta tree}}}.
ScanDocument = dict[str, Any]


class ShapeUnknown(TraceError):
    """The value of a node has no shape known while recording; `str()` says why."""


def meta_tree(value: Any) -> Any:
    """A scan document's tree with each `TensorMeta` record made a meta tensor of that shape and dtype."""
    if isinstance(value, Record):
        if value.type_name == TENSOR_META:
            return torch.empty(value["shape"], dtype=value["dtype"], device="meta")
        return Record(value.type_name, {k: meta_tree(v) for k, v in value.items()})
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(meta_tree(v) for v in value)
    if isinstance(value, list):
        return [meta_tree(v) for v in value]
    if isinstance(value, dict):
        return {k: meta_tree(v) for k, v in value.items()}
    return value


class _Unknown:
    """The meta value of a node that has none, with the reason."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


class Shapes:
    """Meta values of one request's nodes (a trace, or all traces of a session), computed on demand.

    `scan(segment)` fetches the scan of a segment's inputs (the model's cached `Scan` call).
    """

    def __init__(self, graph: Graph, scan: Callable[[Segment], ScanDocument]) -> None:
        self.graph = graph
        self._scan = scan
        self._values: dict[int, Any] = {}
        self.lengths: dict[int, int] = {}  # id(segment) -> the padded length its shapes were read for

    def of(self, node_id: int) -> Any:
        """The meta value of node `node_id` (meta tensors in their containers), or `ShapeUnknown`."""
        pending = [node_id]
        order: list[int] = []
        seen: set[int] = set()
        while pending:  # the node and the uncomputed nodes it reads, without recursion
            nid = pending.pop()
            if nid in seen or nid in self._values:
                continue
            seen.add(nid)
            order.append(nid)
            node = self.graph.nodes[nid]
            pending.extend(ref.id for ref in iter_refs((node.args, node.kwargs)))
        for nid in sorted(order):  # ids are in recording order: each node's inputs come first
            self._values[nid] = self._evaluate(nid)
        value = self._values[node_id]
        if isinstance(value, _Unknown):
            raise ShapeUnknown(value.why)
        return value

    # -- one node ------------------------------------------------------------------------------

    def _evaluate(self, nid: int) -> Any:
        node = self.graph.nodes[nid]
        where = f"%{nid} ({node.op})"
        for ref in iter_refs((node.args, node.kwargs)):
            known = self._values.get(ref.id)
            if isinstance(known, _Unknown):
                return _Unknown(f"{where} is computed from %{ref.id}, whose shape is unknown: {known.why}")
        try:
            return self._compute(node.op, node.args, node.kwargs, nid)
        except _Failed as e:
            return _Unknown(f"{where}: {e}")
        except FarscopeError as e:  # the scan call itself failed
            return _Unknown(f"{where}: the server could not scan the inputs: {e}")
        except Exception as e:  # what meta tensors cannot do (`.item()`, data-dependent shapes)
            return _Unknown(f"{where} cannot run on meta tensors ({type(e).__name__}: {str(e)[:200]})")

    def _compute(self, op: str, args: tuple, kwargs: dict, nid: int) -> Any:
        if op == ops.READ:
            return self._read(args[0], kwargs, nid)
        if op in (ops.SAVE, ops.GRAD):
            return self._resolve(args[0])
        if op == ops.CALL_MODULE:
            raise _Failed("a module called out of order has no scanned shape")
        spec = ops.REGISTRY[op]
        if spec.fn is None:  # write, skip, stop, log, backward, set_grad: no value
            return None
        values, named = self._resolve(args), self._resolve(kwargs)
        if spec.fn is operator.getitem and isinstance(values[0], Record) and isinstance(values[1], int):
            values = (tuple(values[0].values()), values[1])  # a model output indexed by position
        with torch.device("meta"):  # what an op makes from sizes alone is meta too: nothing allocated
            return spec.fn(*values, **named)

    def _read(self, point: HookPoint, kwargs: dict, nid: int) -> Any:
        if point.point not in ops.HOOK_POINTS:
            raise _Failed(f"{point} has no shape while recording (it exists once generation ran)")
        if kwargs.get("call", 0):
            raise _Failed(f"{point} at call/step {kwargs['call']}: only a module's first call is scanned")
        segment = self._segment_of(nid)
        if segment.mode != "trace":
            raise _Failed("shapes while recording are scanned for traces (model.trace / model.scan), "
                          "not for generate")
        document = self._scan(segment)
        self.lengths[id(segment)] = document[LENGTH]
        found = document[MODULES].get(point.module, {})
        if point.point not in found:
            raise _Failed(f"module {point.module or 'model'!r} does not run in this forward pass, so its "
                          f"{point.point} has no shape")
        value = meta_tree(found[point.point])
        rows, invoke = document[ROWS], kwargs.get("invoke")
        if invoke is None or len(rows) <= 1:
            return value
        start, stop = rows[invoke]
        return _narrow(value, start, stop, rows[-1][1])

    def _segment_of(self, nid: int) -> Segment:
        for segment in self.graph.segments:
            if segment.start <= nid < segment.stop:
                return segment
        return self.graph.segments[-1]

    def _resolve(self, value: Any) -> Any:
        def leaf(v: Any) -> Any:
            if isinstance(v, Ref):
                return self._values[v.id]
            if isinstance(v, torch.Tensor):
                return v.to("meta")
            return v
        return map_args(value, leaf)


class _Failed(Exception):
    """Why a node's value is unknown."""


def _narrow(value: Any, start: int, stop: int, size: int) -> Any:
    """The invoke's rows of every batch-sized tensor in `value`, as the executor hands them out."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != size:
            return value
        return value.narrow(0, start, stop - start)
    if isinstance(value, Record):
        return Record(value.type_name, {k: _narrow(v, start, stop, size) for k, v in value.items()})
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(_narrow(v, start, stop, size) for v in value)
    if isinstance(value, list):
        return [_narrow(v, start, stop, size) for v in value]
    if isinstance(value, dict):
        return {k: _narrow(v, start, stop, size) for k, v in value.items()}
    return value
