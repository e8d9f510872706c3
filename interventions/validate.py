"""Validation: the only way from decoded request bytes to a `Graph` the executor will run.

Checks, before anything touches a model: the IR version, the document's shape, every op against the
whitelist, arity, that references point to earlier nodes, that hook points name modules the model
has, argument types (literals, refs, tensors only), that conditional blocks (`if` / `else` / `end`)
nest properly within one trace and no deeper than the limit, and the request's size limits.
"""

from __future__ import annotations

import reprlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from . import ops
from .errors import LimitError, ValidationError, VersionError
from .graph import (
    INVOKES,
    IR_VERSION,
    MODE,
    MODES,
    NODES,
    OPTIONS,
    SEGMENT_KEYS,
    TRACES,
    VERSION,
    Graph,
    HookPoint,
    Node,
    Ref,
    Segment,
)

__all__ = ["DEFAULT_MAX_NODES", "GraphLimits", "validate", "SUPPORTED_IR_VERSIONS"]

SUPPORTED_IR_VERSIONS = (IR_VERSION,)
_MAX_STRING = 100_000
_MAX_WHERE = 1_000

# Values quoted in error messages come from the request: quote them bounded (a hostile value may be
# nested thousands deep, where repr() raises RecursionError, or be 100k characters long).
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 3, 120, 120
_show = _QUOTE.repr


def _key(key: Any) -> str:
    return key if isinstance(key, str) and len(key) < 100 else _show(key)


# The default node limit of a request; the server's models file defaults to it too.
DEFAULT_MAX_NODES = 20_000
# Hook ops, for messages: the ops whose first argument is a module hook point.
_HOOK_OPS = tuple(name for name, spec in ops.REGISTRY.items() if spec.hook_points)


@dataclass(frozen=True, kw_only=True)
class GraphLimits:
    max_nodes: int = DEFAULT_MAX_NODES
    max_invokes: int = 256
    max_input_tokens: int = 1_000_000
    max_new_tokens: int = 4096
    max_block_depth: int = 32  # conditional blocks (if / else) open inside one another


def _fail(message: str, node_id: int | None = None, where: str | None = None) -> ValidationError:
    return ValidationError(message, node_id=node_id, where=where or None)


# Generation keywords a request may pass to `generate`, with their accepted types. Anything that
# changes the batch's rows (beams, several sequences per prompt) is left out: invokes own rows.
GENERATION_OPTIONS: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,),
    "min_new_tokens": (int,),
    "do_sample": (bool,),
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "repetition_penalty": (int, float),
    "no_repeat_ngram_size": (int,),
}


def validate(
    document: Any, *, module_paths: Collection[str], limits: GraphLimits = GraphLimits()
) -> Graph:
    """A checked `Graph` from a decoded document, or `ValidationError` naming what is wrong.

    A document is one trace (`{version, invokes, nodes[, mode, options]}`) or a session of several
    (`{version, traces: [...]}`); node ids count across the whole session.
    """
    if not isinstance(document, dict):
        raise _fail(f"request document must be a map, got {type(document).__name__}")
    version = document.get(VERSION)
    if type(version) is not int or version not in SUPPORTED_IR_VERSIONS:  # not bool/float/tensor
        raise VersionError(
            f"graph IR version {_show(version)} is not supported; this server accepts version(s) "
            f"{', '.join(map(str, SUPPORTED_IR_VERSIONS))}. Upgrade the farscope client or server so "
            "both speak the same version."
        )
    if TRACES in document:
        unknown = set(document) - {VERSION, TRACES}
        traces = document[TRACES]
        if not isinstance(traces, list) or not traces:
            raise _fail(f"{TRACES!r} must be a non-empty list")
    else:
        unknown = set(document) - {VERSION, *SEGMENT_KEYS}
        traces = [{k: v for k, v in document.items() if k != VERSION}]
    if unknown:
        raise _fail(f"request document has unknown keys: {', '.join(sorted(map(_key, unknown)))}")
    graph = Graph(version=version, segments=[])
    paths = set(module_paths)
    total_nodes = total_tokens = 0
    for number, trace in enumerate(traces):
        segment = _check_segment(number, trace, limits)
        total_nodes += len(trace[NODES])
        if total_nodes > limits.max_nodes:
            raise LimitError(f"graph has {total_nodes} nodes; the limit (max_nodes) is {limits.max_nodes}")
        total_tokens += sum(_check_input(i, inp) for i, inp in enumerate(segment.invokes))
        if total_tokens > limits.max_input_tokens:
            raise LimitError(f"inputs hold {total_tokens} tokens; the limit is {limits.max_input_tokens}")
        segment.start = segment.stop = len(graph.nodes)
        graph.segments.append(segment)
        blocks = _Blocks(graph, limits.max_block_depth)
        for raw in trace[NODES]:
            node = _check_node(len(graph.nodes), raw, paths, segment)
            blocks.check(node)
            graph.nodes.append(node)
            segment.stop = len(graph.nodes)
        blocks.check_closed(number)
    return graph


class _Blocks:
    """The conditional blocks open while one trace's nodes are checked, innermost last.

    `if(cond)` opens a block; `end(%opener)` closes the innermost one and must name it; `else(%if)`
    opens the other branch of an `if` and must come right after that `if`'s `end`. A block never spans
    two traces, and blocks nest no deeper than `max_depth`.
    """

    def __init__(self, graph: Graph, max_depth: int) -> None:
        self.graph = graph
        self.max_depth = max_depth
        self.open: list[int] = []  # opener node ids
        self.closed_if: int | None = None  # the `if` whose `end` is the node just checked
        self.has_else: set[int] = set()

    def check(self, node: Node) -> None:
        spec = ops.REGISTRY[node.op]
        closed_if, self.closed_if = self.closed_if, None
        if not (spec.opens_block or spec.closes_block):
            return
        target = node.args[0]
        if node.op == ops.ELSE:
            if not isinstance(target, Ref) or target.id != closed_if or target.id in self.has_else:
                raise _fail(f"{node.format()}: an else must come right after the end of its if, once",
                            node.id, node.where)
            self.has_else.add(target.id)
        if spec.opens_block:
            if len(self.open) >= self.max_depth:
                raise LimitError(f"conditional blocks nest {len(self.open) + 1} deep; the limit (max_block_depth) "
                                 f"is {self.max_depth}", node_id=node.id, where=node.where or None)
            self.open.append(node.id)
            return
        if not self.open or target != Ref(self.open[-1]):
            innermost = f"%{self.open[-1]}" if self.open else "none is open"
            raise _fail(f"{node.format()}: an end must close the innermost open block ({innermost})",
                        node.id, node.where)
        self.open.pop()
        if self.graph.nodes[target.id].op == ops.IF:
            self.closed_if = target.id

    def check_closed(self, number: int) -> None:
        if self.open:
            opener = self.graph.nodes[self.open[-1]]
            raise _fail(f"trace {number}: block {opener.format()} is never closed (no end)", opener.id,
                        opener.where)


def _check_segment(number: int, trace: Any, limits: GraphLimits) -> Segment:
    what = f"trace {number}"
    if not isinstance(trace, dict):
        raise _fail(f"{what} must be a map")
    unknown = set(trace) - set(SEGMENT_KEYS)
    if unknown:
        raise _fail(f"{what} has unknown keys: {', '.join(sorted(map(_key, unknown)))}")
    invokes, nodes = trace.get(INVOKES), trace.get(NODES)
    if not isinstance(invokes, list) or not isinstance(nodes, list):
        raise _fail(f"request document needs lists {INVOKES!r} and {NODES!r}")
    if len(invokes) > limits.max_invokes:
        raise LimitError(f"{len(invokes)} invokes exceed the limit of {limits.max_invokes}")
    mode = trace.get(MODE, "trace")
    if mode not in MODES:
        raise _fail(f"{what}: unknown mode {_show(mode)}; use one of {', '.join(MODES)}")
    options = trace.get(OPTIONS, {})
    if not isinstance(options, dict):
        raise _fail(f"{what}: options must be a map")
    if options and mode != "generate":
        raise _fail(f"{what}: options are only accepted with mode 'generate'")
    for key, value in options.items():
        kinds = GENERATION_OPTIONS.get(key) if isinstance(key, str) else None
        if kinds is None:
            raise _fail(f"generation option {_show(key)} is not accepted; accepted: {', '.join(GENERATION_OPTIONS)}")
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise _fail(f"generation option {key} must be {' or '.join(k.__name__ for k in kinds)}, got {_show(value)}")
    if mode == "generate":
        steps = options.get("max_new_tokens")
        if not isinstance(steps, int) or not 1 <= steps <= limits.max_new_tokens:
            raise LimitError(f"generate needs max_new_tokens between 1 and {limits.max_new_tokens}, got {_show(steps)}")
    return Segment(mode, invokes, options)


def _check_input(index: int, value: Any) -> int:
    """Token (or character) count of one invoke's input; raises if its type is not accepted."""
    what = f"input of invoke {index}"
    if isinstance(value, str):
        if len(value) > _MAX_STRING:
            raise _fail(f"{what} is longer than {_MAX_STRING} characters")
        return len(value)
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int64, torch.int32) or value.dim() not in (1, 2):
            raise _fail(f"{what}: token ids must be a 1-D or 2-D integer tensor")
        return value.numel()
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return sum(_check_input(index, v) for v in value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return len(value)
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return sum(len(v) for v in value)
    raise _fail(
        f"{what} must be a string, a list of strings, or token ids (a list of ints, a list of "
        f"lists of ints, or an integer tensor); got {type(value).__name__}"
    )


def _check_node(index: int, raw: Any, paths: set[str], segment: Segment) -> Node:
    if not isinstance(raw, list) or len(raw) != 4:
        raise _fail(f"node {index} must be [op, args, kwargs, where]", index)
    op, args, kwargs, where = raw
    if not isinstance(where, str) or len(where) > _MAX_WHERE:
        raise _fail(f"node {index}: 'where' must be a short string", index)
    if not isinstance(op, str) or op not in ops.REGISTRY:
        raise _fail(f"unknown op {_show(op)}: not in the whitelist", index, where)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise _fail(f"node {index} ({op}): args must be a tuple and kwargs a map", index, where)
    spec = ops.REGISTRY[op]
    if len(args) < spec.min_args or (spec.max_args is not None and len(args) > spec.max_args):
        expected = (spec.min_args if spec.max_args == spec.min_args else f"at least {spec.min_args}"
                    if spec.max_args is None else f"{spec.min_args}..{spec.max_args}")
        raise _fail(f"op {op} takes {expected} positional arguments, got {len(args)}", index, where)
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise _fail(f"op {op}: keyword {_show(key)} is not a valid argument name", index, where)
    node = Node(index, op, args, kwargs, where)
    hook_points = spec.hook_points or None
    for i, arg in enumerate(args):
        _check_value(arg, node, paths, hook_points=hook_points if i == 0 else None, depth=0)
    for arg in kwargs.values():
        _check_value(arg, node, paths, hook_points=None, depth=0)
    if hook_points is not None:
        _check_hook_node(node, segment, spec)
        return node
    if spec.gradient_target:
        if not isinstance(args[0], Ref):
            raise _fail(f"{op} needs a reference to a value as first argument", index, where)
        if segment.mode == "generate":
            raise _fail(f"{op}: gradients are not supported under generate; take them in a trace "
                        "(model.trace), which may sit in the same session", index, where)
    if spec.keywords is not None and not set(kwargs) <= spec.keywords:
        if not spec.keywords:
            raise _fail(f"{op} takes no keywords", index, where)
        raise _fail(f"{op} accepts only {', '.join(f'{k}=' for k in sorted(spec.keywords))}", index, where)
    if op == ops.GETATTR and not (isinstance(args[1], str) and args[1] in ops.TENSOR_ATTRIBUTES):
        raise _fail(
            f"attribute {_show(args[1])} is not readable remotely; readable: "
            f"{', '.join(sorted(ops.TENSOR_ATTRIBUTES))}", index, where)
    if op == ops.FAIL and not (isinstance(args[0], str) and len(args[0]) <= _MAX_WHERE):
        raise _fail(f"fail needs a message of at most {_MAX_WHERE} characters", index, where)
    if op == ops.FIELD and not (isinstance(args[1], str) and args[1].isidentifier()
                                and not args[1].startswith("_")):
        raise _fail(f"field name {_show(args[1])} is not allowed", index, where)
    return node


def _check_hook_node(node: Node, segment: Segment, spec: ops.OpSpec) -> None:
    op, args, kwargs, index, where = node.op, node.args, node.kwargs, node.id, node.where
    if not isinstance(args[0], HookPoint):
        raise _fail(f"{op} needs a module hook point as first argument", index, where)
    if spec.keywords is None:
        return  # call_module: its keywords are the module's own
    n_invokes = len(segment.invokes)
    invoke, call = kwargs.get("invoke"), kwargs.get("call", 0)
    # A read may span the whole batch (invoke=None), e.g. tracer.result outside an invoke, and may be
    # optional (a cache of every module: one that never runs is left out instead of failing).
    whole = op == ops.READ and "invoke" in kwargs and invoke is None
    if not set(kwargs) <= spec.keywords or not whole and (
            type(invoke) is not int or not 0 <= invoke < n_invokes):
        raise _fail(f"{node.format()}: needs invoke=<0..{n_invokes - 1}>", index, where)
    if not n_invokes:  # a whole-batch read of no inputs: there is no forward pass to read from
        raise _fail(f"{node.format()}: the trace has no inputs (invokes) to run the model on", index, where)
    if type(kwargs.get("optional", False)) is not bool:
        raise _fail(f"{node.format()}: optional must be true or false", index, where)
    if type(call) is not int or call < 0:
        raise _fail(f"{node.format()}: call must be a non-negative int", index, where)
    if args[0].point in ops.ROOT_POINTS and (args[0].module != "" or segment.mode != "generate"):
        raise _fail(f"{args[0]} exists only on the model itself under generate", index, where)


def _check_value(value: Any, node: Node, paths: set[str], *, hook_points: tuple[str, ...] | None,
                 depth: int) -> None:
    where = node.where
    if depth > 32:
        raise _fail(f"arguments of node {node.id} nest too deeply", node.id, where)
    if value is None or value is Ellipsis or isinstance(value, (bool, str, torch.dtype, torch.Tensor)):
        if isinstance(value, str) and len(value) > _MAX_STRING:
            raise _fail(f"a string argument of node {node.id} is too long", node.id, where)
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        return  # NaN/inf are legal floats; ops that need ints reject them when they run
    if isinstance(value, Ref):
        if value.id >= node.id:
            raise _fail(f"node {node.id} ({node.op}) refers to %{value.id}, which is not an earlier node",
                        node.id, where)
        return
    if isinstance(value, HookPoint):
        if hook_points is None:
            raise _fail(f"a hook point may only be the first argument of {'/'.join(_HOOK_OPS)} "
                        f"(node {node.id})", node.id, where)
        if value.point not in hook_points:
            raise _fail(f"unknown hook point {_show(value.point)} for {node.op}; use one of "
                        f"{', '.join(hook_points)}", node.id, where)
        if value.module not in paths:
            raise _fail(f"the model has no module {_show(value.module)}{_suggest(value.module, paths)}",
                        node.id, where)
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_value(v, node, paths, hook_points=None, depth=depth + 1)
        return
    if isinstance(value, slice):
        for v in (value.start, value.stop, value.step):
            _check_value(v, node, paths, hook_points=None, depth=depth + 1)
        return
    if isinstance(value, dict):
        for v in value.values():
            _check_value(v, node, paths, hook_points=None, depth=depth + 1)
        return
    raise _fail(f"argument of type {type(value).__name__} is not allowed (node {node.id})", node.id, where)


def _suggest(path: str, paths: set[str]) -> str:
    parent = path.rpartition(".")[0]
    children = sorted(p.rpartition(".")[2] for p in paths if p.rpartition(".")[0] == parent and p)
    if not children or (parent and parent not in paths):
        return ""
    shown = ", ".join(children[:12]) + (", ..." if len(children) > 12 else "")
    return f"; {parent or 'the root'} has: {shown}"

