"""Co-batching: small compatible trace requests, from any users, share one batched forward pass.

Requests merge when each is one plain trace whose inputs all tokenize to the same length: then no
row is padded, every row computes exactly what it computes alone, and each request's invokes keep
their own rows (an invoke's interventions only ever touch its rows). Node ids and invoke indices of
each request are shifted into the merged graph and shifted back in its results.

Isolation: a job's results in a shared pass are bit-identical to its solo run (one torch thread),
whatever the other jobs do. What could break that, and the rule for each:

- Values at a hook point that are not per-row (no batch dimension: rotary tables, position ids,
  cache positions; containers such as a module's kwargs) would be one object shared by every job.
  Each job gets a private copy of them (`SharedPass.hand_out`). A job that changes its copy (an
  in-place op, ``out=``, ``setitem``, anything that bumps the tensor's version counter) would, alone,
  have changed the model's value for the rest of its pass, which a shared pass cannot give one job:
  its shared-pass results are discarded and it runs again alone. So does a job that writes into a
  value that is not per-row, and one that changes, after another job replaced it, a value it was
  handed rows of (alone, its edit would have reached the model; shared, it no longer does).
- Jobs that hook an ``attn_probs`` point switch the whole pass to eager attention (attention.py):
  they share passes only with each other (`batch_key`).
- A job whose node fails, or whose nodes never run, leaves the pass; it runs again alone, so it
  gets its solo error while the others keep their shared results.
- A shared pass's batch size never equals its sequence length (`Replica.execute_many` splits it):
  per-row values are told apart from values without a batch dimension by their first dimension,
  and the latter's first dimension is 1 or the sequence length (cache positions) in every model.
- Random ops (``torch.rand*``, ``multinomial``) draw from the server's global generator, which no
  request can seed: their values are not reproducible in any mode, co-batched or not, and a job
  that draws none is not affected by a co-tenant that does (the models draw nothing in eval mode).
- Whole-pass ops (``stop``, ``skip``, gradients, ``log``), whole-batch reads (``invoke=None``),
  sessions and generation never share a pass.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any

import torch

from farscope.interventions import ops
from farscope.interventions.graph import Graph, HookPoint, Node, Ref, Segment, map_args

__all__ = ["SharedPass", "batch_key", "merge", "rebuild", "split"]


def batch_key(graph: Graph, lengths: list[int], eager_modules: Collection[str] = ()) -> Hashable | None:
    """What a graph may merge with (graphs with equal keys), or None if it must run alone.

    `lengths`: the token count of every row of its inputs. `eager_modules`: the module paths whose
    hooking switches the whole pass to eager attention (attention.py's `attn_probs` points).
    """
    if len(graph.segments) != 1 or graph.segments[0].mode != "trace" or graph.segments[0].options:
        return None
    if any(ops.REGISTRY[node.op].solo for node in graph.nodes):
        return None  # its effect reaches beyond its own invoke's rows, or over the whole pass
    if any(node.op == ops.READ and node.kwargs.get("invoke") is None for node in graph.nodes):
        return None  # a whole-batch read would see the other requests' rows
    if len(set(lengths)) != 1:
        return None
    eager = any(ops.REGISTRY[node.op].hooked and node.args[0].module in eager_modules for node in graph.nodes)
    return ("trace", lengths[0], "eager" if eager else "delegated")


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


# Values handed to a job as they are: nothing a graph can do changes them.
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
              HookPoint, type(Ellipsis))


class _Unshareable(Exception):
    """A job was about to be handed (or to change) something it cannot have to itself in a shared pass."""


class SharedPass:
    """The bookkeeping of one shared forward pass of a merged graph (see `merge`).

    Job i owns nodes [node_starts[i], node_starts[i + 1]) and invokes [invoke_starts[i],
    invoke_starts[i + 1]). The executor asks it what to hand a job at a hook point (`hand_out`),
    tells it when a write replaces a value (`replacing`), and evicts a job from the pass (`evict`);
    `check()` at the end finds the jobs that changed what only they should have seen.
    """

    def __init__(self, graphs: Sequence[Graph], offsets: Sequence[int]) -> None:
        self.node_starts = [*offsets, offsets[-1] + len(graphs[-1].nodes)]
        invoke_starts = [0]
        for graph in graphs:
            invoke_starts.append(invoke_starts[-1] + len(graph.segments[0].invokes))
        self.invoke_starts = invoke_starts
        self.evicted: dict[int, str] = {}  # job -> why it must run again alone
        self._copies: list[tuple[int, torch.Tensor, int]] = []  # job, private copy, its version then
        self._containers: list[tuple[int, Any, list[Any]]] = []  # job, private list/dict, its items then
        # storage address -> jobs handed rows of it (an address reused after a free can only make a
        # job run again alone needlessly, never keep one that should not)
        self._views: dict[int, set[int]] = {}
        self._replaced: list[tuple[int, set[int], list[tuple[torch.Tensor, int]]]] = []

    @property
    def size(self) -> int:
        return len(self.node_starts) - 1

    def job_of(self, node_id: int) -> int:
        return bisect_right(self.node_starts, node_id) - 1

    def nodes_of(self, job: int) -> range:
        return range(self.node_starts[job], self.node_starts[job + 1])

    def evict(self, job: int, reason: str) -> None:
        self.evicted.setdefault(job, reason)

    def hand_out(self, job: int, value: Any, invoke: int, rows: list[tuple[int, int]]) -> Any:
        """What job `job`'s read at a hook point whose value is `value` gets: the rows of its invoke of
        per-row tensors (views: its edits land in its rows, as alone), a private copy of the rest."""
        size = rows[-1][1]
        first, stop = rows[self.invoke_starts[job]][0], rows[self.invoke_starts[job + 1] - 1][1]
        several = self.invoke_starts[job + 1] - self.invoke_starts[job] > 1
        start, end = rows[invoke]

        def leaf(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                if v.dim() > 0 and v.shape[0] == size:
                    self._views.setdefault(_storage(v), set()).add(job)
                    return v.narrow(0, start, end - start)
                copy = _private_copy(v)
                self._copies.append((job, copy, copy._version))
                # Alone, with several invokes, its own batch is `stop - first` rows: a value that long
                # is narrowed there (by its rows counted from its first), so here too.
                if several and copy.dim() > 0 and copy.shape[0] == stop - first:
                    return copy.narrow(0, start - first, end - start)
                return copy
            if isinstance(v, _IMMUTABLE):
                return v
            raise _Unshareable(f"its read hands out a {type(v).__name__}, which a shared pass cannot copy")

        return self._rebuild(job, value, leaf)

    def _rebuild(self, job: int, value: Any, leaf: Callable[[Any], Any]) -> Any:
        def watch(container: Any) -> None:  # to see, at the end, whether the job changed it
            self._containers.append((job, container, _items(container)))
        return rebuild(value, leaf, watch)

    def replacing(self, writer: int, current: Any) -> None:
        """Job `writer` replaces `current` (a write): others handed its rows must not change them later."""
        tensors = [v for v in _leaves(current) if isinstance(v, torch.Tensor)]
        holders = set().union(*(self._views.get(_storage(t), set()) for t in tensors)) - {writer}
        if holders:
            self._replaced.append((writer, holders, [(t, t._version) for t in tensors]))

    def check(self) -> dict[int, str]:
        """Evict the jobs that changed a private copy, or rows of a value after it was replaced."""
        for job, copy, version in self._copies:
            if copy._version != version:
                self.evict(job, "it changed, in place, a value without a batch dimension that the whole pass "
                                "shares (alone, the change would reach the rest of its pass)")
        for job, container, items in self._containers:
            if _items(container) != items:
                self.evict(job, "it changed a container (a module's arguments) that the whole pass shares")
        for _, holders, tensors in self._replaced:
            if any(t._version != version for t, version in tensors):
                for job in holders:
                    self.evict(job, "a value it holds rows of was replaced by another job and then changed "
                                    "in place (alone, the change would reach the rest of its pass)")
        self._copies.clear()
        self._containers.clear()
        self._replaced.clear()
        self._views.clear()
        return self.evicted


def rebuild(value: Any, leaf: Callable[[Any], Any], on_container: Callable[[Any], None] | None = None) -> Any:
    """`value` with every leaf passed through `leaf`, in new containers of the same types (a model
    output stays a model output, as in a solo run); `on_container` sees each new list and dict."""
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(rebuild(v, leaf, on_container) for v in value)
    if isinstance(value, list):
        out: Any = [rebuild(v, leaf, on_container) for v in value]
    elif isinstance(value, dict):
        out = type(value).__new__(type(value))
        dict.__init__(out)
        for key, item in value.items():
            out[key] = rebuild(item, leaf, on_container)
    else:
        return leaf(value)
    if on_container is not None:
        on_container(out)
    return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _items(container: Any) -> list[Any]:
    """A container's entries by identity, to tell whether it was changed."""
    pairs = container.items() if isinstance(container, dict) else enumerate(container)
    return [(key, id(value)) for key, value in pairs]


def _leaves(value: Any) -> list[Any]:
    found: list[Any] = []
    map_args(value, found.append)
    return found


def _private_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` with its exact layout (strides, even overlapping ones), so that every op computes
    on it bit for bit what it computes on `t`; its storage is its own."""
    if t.numel() == 0 or t.dim() == 0:
        return t.clone()
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    flat = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (span,), (1,))
    owned = flat.detach().clone()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(owned.untyped_storage(), 0, t.shape, t.stride())

