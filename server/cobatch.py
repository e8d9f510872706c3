"""Co-batching: small compatible trace requests, from any users, share one batched forward pass.

Requests merge when each is one plain trace whose inputs all tokenize to the same length: then no
row is padded, every row computes exactly what it computes alone, and each request's invokes keep
their own rows (an invoke's interventions only ever touch its rows). Node ids and invoke indices of
each request are shifted into the merged graph and shifted back in its results.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from farscope.interventions import ops
from farscope.interventions.graph import Graph, Node, Ref, Segment, map_args

__all__ = ["batch_key", "merge", "split"]


def batch_key(graph: Graph, lengths: list[int]) -> Hashable | None:
    """What a graph may merge with (graphs with equal keys), or None if it must run alone.

    `lengths`: the token count of every row of its inputs.
    """
    if len(graph.segments) != 1 or graph.segments[0].mode != "trace":
        return None
    if any(ops.REGISTRY[node.op].solo for node in graph.nodes):
        return None  # its effect reaches beyond its own invoke's rows, or over the whole pass
    if any(node.op == ops.READ and node.kwargs.get("invoke") is None for node in graph.nodes):
        return None  # a whole-batch read would see the other requests' rows
    if len(set(lengths)) != 1:
        return None
    return ("trace", lengths[0])


def merge(graphs: list[Graph]) -> tuple[Graph, list[int]]:
    """One graph running all of `graphs`; returns it and each graph's node-id offset."""
    merged = Graph(segments=[Segment("trace", [], {}, 0, 0)])
    offsets = []
    for graph in graphs:
        node_offset, invoke_offset = len(merged.nodes), len(merged.segments[0].invokes)
        offsets.append(node_offset)
        merged.segments[0].invokes.extend(graph.segments[0].invokes)

        def shift(value: Any, by: int = node_offset) -> Any:
            return Ref(value.id + by) if isinstance(value, Ref) else value
        for node in graph.nodes:
            kwargs = map_args(node.kwargs, shift)
            if ops.REGISTRY[node.op].hooked and isinstance(kwargs.get("invoke"), int):
                kwargs["invoke"] += invoke_offset
            merged.nodes.append(Node(len(merged.nodes), node.op, map_args(node.args, shift), kwargs, node.where))
        merged.segments[0].stop = len(merged.nodes)
    return merged, offsets


def split(saved: dict[int, Any], graphs: list[Graph], offsets: list[int]) -> list[dict[int, Any]]:
    """Each graph's saved values, keyed by its own node ids."""
    parts = []
    for graph, offset in zip(graphs, offsets, strict=True):
        ids = range(offset, offset + len(graph.nodes))
        parts.append({nid - offset: value for nid, value in saved.items() if nid in ids})
    return parts
