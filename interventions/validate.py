"""Validation: the only way from decoded request bytes to a `Graph` the executor will run.

Checks, before anything touches a model: the IR version, the document's shape, every op against the
whitelist, arity, that references point to earlier nodes, that hook points name modules the model
has, argument types (literals, refs, tensors only), and the request's size limits.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from . import ops
from .errors import LimitError, ValidationError, VersionError
from .graph import IR_VERSION, Graph, HookPoint, Node, Ref

__all__ = ["GraphLimits", "validate", "SUPPORTED_IR_VERSIONS"]

SUPPORTED_IR_VERSIONS = (IR_VERSION,)
_MAX_STRING = 100_000
_MAX_WHERE = 1_000

# Values quoted in error messages come from the request: quote them bounded (a hostile value may be
# nested thousands deep, where repr() raises RecursionError, or be 100k characters long).
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 3, 120, 120
_show = _QUOTE.repr


@dataclass(frozen=True, kw_only=True)
class GraphLimits:
    max_nodes: int = 20_000
    max_invokes: int = 256
    max_input_tokens: int = 1_000_000


def _fail(message: str, node_id: int | None = None, where: str | None = None) -> ValidationError:
    return ValidationError(message, node_id=node_id, where=where or None)


def validate(
    document: Any, *, module_paths: Collection[str], limits: GraphLimits = GraphLimits()
) -> Graph:
    """A checked `Graph` from a decoded document, or `ValidationError` naming what is wrong."""
    if not isinstance(document, dict):
        raise _fail(f"request document must be a map, got {type(document).__name__}")
    unknown = set(document) - {"version", "invokes", "nodes"}
    if unknown:
        raise _fail(f"request document has unknown keys: {', '.join(sorted(map(str, unknown)))}")
    version = document.get("version")
    if type(version) is not int or version not in SUPPORTED_IR_VERSIONS:  # not bool/float/tensor
        raise VersionError(
            f"graph IR version {_show(version)} is not supported; this server accepts version(s) "
            f"{', '.join(map(str, SUPPORTED_IR_VERSIONS))}. Upgrade the farscope client or server so "
            "both speak the same version."
        )
    invokes = document.get("invokes")
    nodes = document.get("nodes")
    if not isinstance(invokes, list) or not isinstance(nodes, list):
        raise _fail("request document needs lists 'invokes' and 'nodes'")
    if len(invokes) > limits.max_invokes:
        raise LimitError(f"{len(invokes)} invokes exceed the limit of {limits.max_invokes}")
    if len(nodes) > limits.max_nodes:
        raise LimitError(f"graph has {len(nodes)} nodes; the limit (max_nodes) is {limits.max_nodes}")
    tokens = sum(_check_input(i, inp) for i, inp in enumerate(invokes))
    if tokens > limits.max_input_tokens:
        raise LimitError(f"inputs hold {tokens} tokens; the limit is {limits.max_input_tokens}")
    graph = Graph(invokes=invokes, version=version)
    paths = set(module_paths)
    for index, raw in enumerate(nodes):
        graph.nodes.append(_check_node(index, raw, paths, len(invokes)))
    return graph


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


def _check_node(index: int, raw: Any, paths: set[str], n_invokes: int) -> Node:
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
    for i, arg in enumerate(args):
        _check_value(arg, node, paths, allow_hook=(op in ("read", "write") and i == 0), depth=0)
    for arg in kwargs.values():
        _check_value(arg, node, paths, allow_hook=False, depth=0)
    if op in ("read", "write"):
        if not isinstance(args[0], HookPoint):
            raise _fail(f"{op} needs a module hook point as first argument", index, where)
        invoke = kwargs.get("invoke")
        if set(kwargs) != {"invoke"} or not isinstance(invoke, int) or not 0 <= invoke < n_invokes:
            raise _fail(f"{node.format()}: needs invoke=<0..{n_invokes - 1}>", index, where)
    elif op == "getattr" and not (isinstance(args[1], str) and args[1] in ops.TENSOR_ATTRIBUTES):
        raise _fail(
            f"attribute {_show(args[1])} is not readable remotely; readable: "
            f"{', '.join(sorted(ops.TENSOR_ATTRIBUTES))}", index, where)
    elif op == "field" and not (isinstance(args[1], str) and args[1].isidentifier()
                                and not args[1].startswith("_")):
        raise _fail(f"field name {_show(args[1])} is not allowed", index, where)
    return node


def _check_value(value: Any, node: Node, paths: set[str], *, allow_hook: bool, depth: int) -> None:
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
        if not allow_hook:
            raise _fail(f"a hook point may only be the first argument of read/write (node {node.id})",
                        node.id, where)
        if value.point not in ops.HOOK_POINTS:
            raise _fail(f"unknown hook point {_show(value.point)}; use one of {', '.join(ops.HOOK_POINTS)}",
                        node.id, where)
        if value.module not in paths:
            raise _fail(f"the model has no module {_show(value.module)}{_suggest(value.module, paths)}",
                        node.id, where)
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_value(v, node, paths, allow_hook=False, depth=depth + 1)
        return
    if isinstance(value, slice):
        for v in (value.start, value.stop, value.step):
            _check_value(v, node, paths, allow_hook=False, depth=depth + 1)
        return
    if isinstance(value, dict):
        for v in value.values():
            _check_value(v, node, paths, allow_hook=False, depth=depth + 1)
        return
    raise _fail(f"argument of type {type(value).__name__} is not allowed (node {node.id})", node.id, where)


def _suggest(path: str, paths: set[str]) -> str:
    parent = path.rpartition(".")[0]
    children = sorted(p.rpartition(".")[2] for p in paths if p.rpartition(".")[0] == parent and p)
    if not children or (parent and parent not in paths):
        return ""
    shown = ", ".join(children[:12]) + (", ..." if len(children) > 12 else "")
    return f"; {parent or 'the root'} has: {shown}"


def estimated_bytes(shape: list[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
