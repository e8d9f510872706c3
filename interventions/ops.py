"""The op registry: the one whitelist of what a graph may do.

Every op a graph node may name is listed here exactly once. The client's proxies record through this
table, the validator checks against it and the server's executor dispatches through it; no op name is
spelled anywhere else. An op is one of:

- ``operator``: a Python operator (``add``, ``getitem``, ``iadd`` ...), applied with ``operator.*``.
- ``method``:   a ``torch.Tensor`` method, wire name ``Tensor.<name>``.
- ``function``: a ``torch`` or ``torch.nn.functional`` function, wire name ``torch.<name>`` or
  ``torch.nn.functional.<name>``.
- ``special``:  handled by the executor itself: ``read`` / ``write`` / ``skip`` of a module hook point,
  ``call_module`` (run a module out of order), ``backward`` / ``grad`` / ``set_grad`` (gradients),
  ``stop``, ``log``, ``save``, ``getattr`` of a whitelisted tensor attribute, ``field`` of a model
  output (``.logits``).

Adding an op is one entry here plus one test in ``tests/interventions/test_ops.py``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "READ", "WRITE", "SKIP", "CALL_MODULE", "GRAD", "SET_GRAD", "BACKWARD", "STOP", "LOG", "SAVE",
    "GETATTR", "FIELD", "SETITEM",
    "OpSpec",
    "REGISTRY",
    "TENSOR_ATTRIBUTES",
    "HOOK_POINTS",
    "HOOK_OPS",
    "TARGET_OPS",
    "OPERATOR_DUNDERS",
    "op_for_torch_function",
    "get",
]

# The special ops' wire names. Code that treats one of them specially names it by these constants, so
# that this module stays the one place where op names are spelled.
READ = "read"  # read(hook, invoke=i, call=c): a module's output / input / inputs, or the generated ids
WRITE = "write"  # write(hook, value, invoke=i, call=c): replace a hook point's value in the invoke's rows
SKIP = "skip"  # skip(module.output, value, invoke=i, call=c): the module does not run; value is its output
CALL_MODULE = "call_module"  # call_module(module.forward, *args, **kwargs): run a module out of order
GRAD = "grad"  # grad(%x): %x's gradient, during backward
SET_GRAD = "set_grad"  # set_grad(%x, value): replace %x's gradient
BACKWARD = "backward"  # backward(%loss, retain_graph=...)
STOP = "stop"  # end the forward pass here
LOG = "log"  # send values to the client as a log event
SAVE = "save"  # send a value back when the request ends
GETATTR = "getattr"  # getattr(%x, name): a whitelisted tensor attribute (TENSOR_ATTRIBUTES)
FIELD = "field"  # field(%out, name): a model output's field (.logits) or a torch named result's
SETITEM = "setitem"  # %x[key] = value (in place; records as an operator)

# Hook points of a module: its output, its first positional input, all of (args, kwargs). The root
# module also has `result` under generate: the generated token ids. `forward` names a module to call.
HOOK_POINTS = ("output", "input", "inputs")
ROOT_POINTS = ("result",)
CALL_POINT = "forward"
# Ops whose first argument is a module hook point, and the points each accepts.
HOOK_OPS = {
    READ: HOOK_POINTS + ROOT_POINTS,
    WRITE: HOOK_POINTS,
    SKIP: ("output",),
    CALL_MODULE: (CALL_POINT,),
}
# Ops whose first argument must be a reference to the value they concern.
TARGET_OPS = (GRAD, SET_GRAD, BACKWARD)

# Attributes that may be read off a value with the `getattr` op. Anything else is refused, so a
# graph can never walk into `__class__`, `__globals__` or a module's internals.
TENSOR_ATTRIBUTES = frozenset(
    {"shape", "dtype", "ndim", "T", "mT", "H", "real", "imag", "requires_grad", "is_leaf"}
)


@dataclass(frozen=True)
class OpSpec:
    """One whitelisted op: its wire name, kind, positional arity and the callable the server runs."""

    name: str
    kind: str
    fn: Callable[..., Any] | None
    min_args: int
    max_args: int | None  # None: variadic
    inplace: bool = False


def _field(obj: Any, key: str) -> Any:
    # Model outputs (`CausalLMOutputWithPast`) are mappings; `.logits` reads a key, never an attribute.
    if isinstance(obj, Mapping):
        if key not in obj:
            raise KeyError(f"{type(obj).__name__} has no field {key!r}; fields: {', '.join(obj.keys())}")
        return obj[key]
    # torch's named results (`x.topk(k).indices`, `x.max(dim).values`), by their declared fields only.
    if type(obj).__module__ == "torch.return_types" and key in getattr(type(obj), "__match_args__", ()):
        return getattr(obj, key)
    raise TypeError(
        f"cannot read field {key!r} of a {type(obj).__name__}; fields exist only on model outputs"
    )


def _getattr(obj: Any, name: str) -> Any:
    if name not in TENSOR_ATTRIBUTES:
        raise AttributeError(f"attribute {name!r} is not readable remotely")
    return getattr(obj, name)


def _setitem(obj: Any, key: Any, value: Any) -> Any:
    obj[key] = value
    return obj


def _save(value: Any) -> Any:
    return value


# name: (callable, arity, dunder, reflected dunder or None)
_BINARY = {
    "add": (operator.add, "__add__", "__radd__"),
    "sub": (operator.sub, "__sub__", "__rsub__"),
    "mul": (operator.mul, "__mul__", "__rmul__"),
    "truediv": (operator.truediv, "__truediv__", "__rtruediv__"),
    "floordiv": (operator.floordiv, "__floordiv__", "__rfloordiv__"),
    "mod": (operator.mod, "__mod__", "__rmod__"),
    "pow": (operator.pow, "__pow__", "__rpow__"),
    "matmul": (operator.matmul, "__matmul__", "__rmatmul__"),
    "and_": (operator.and_, "__and__", "__rand__"),
    "or_": (operator.or_, "__or__", "__ror__"),
    "xor": (operator.xor, "__xor__", "__rxor__"),
    "lshift": (operator.lshift, "__lshift__", "__rlshift__"),
    "rshift": (operator.rshift, "__rshift__", "__rrshift__"),
    "eq": (operator.eq, "__eq__", None),
    "ne": (operator.ne, "__ne__", None),
    "lt": (operator.lt, "__lt__", None),
    "le": (operator.le, "__le__", None),
    "gt": (operator.gt, "__gt__", None),
    "ge": (operator.ge, "__ge__", None),
    "getitem": (operator.getitem, "__getitem__", None),
}
_INPLACE = {
    "iadd": (operator.iadd, "__iadd__"),
    "isub": (operator.isub, "__isub__"),
    "imul": (operator.imul, "__imul__"),
    "itruediv": (operator.itruediv, "__itruediv__"),
    "ifloordiv": (operator.ifloordiv, "__ifloordiv__"),
    "imod": (operator.imod, "__imod__"),
    "ipow": (operator.ipow, "__ipow__"),
    "imatmul": (operator.imatmul, "__imatmul__"),
    "iand": (operator.iand, "__iand__"),
    "ior": (operator.ior, "__ior__"),
    "ixor": (operator.ixor, "__ixor__"),
}
_UNARY = {
    "neg": (operator.neg, "__neg__"),
    "pos": (operator.pos, "__pos__"),
    "abs": (operator.abs, "__abs__"),
    "invert": (operator.invert, "__invert__"),
}

# Tensor methods a graph may call. In-place ones (trailing underscore) mutate activations, which is
# how ablation and steering edit a forward pass.
_TENSOR_METHODS = """
abs add all amax amin any argmax argmin argsort bfloat16 bmm bool chunk clamp clip clone contiguous
cos cpu cumsum detach diag diagonal diff dim div double eq exp expand expand_as flatten flip float
gather ge gt half index_select int isfinite isinf isnan item le log log_softmax logsumexp long lt
masked_fill matmul max mean min mm mul nan_to_num narrow ne neg new_full new_ones new_zeros norm
numel outer permute pow prod reciprocal relu repeat repeat_interleave reshape reshape_as roll round
rsqrt scatter sigmoid sign sin size softmax sort split sqrt square squeeze std sub sum t tanh tolist
topk transpose tril triu type_as unbind unflatten unsqueeze var view view_as where
abs_ add_ clamp_ copy_ div_ fill_ index_fill_ masked_fill_ mul_ neg_ scatter_ sub_ zero_ to
""".split()

_TORCH_FUNCTIONS = """
abs allclose amax amin any all arange argmax argmin argsort bmm cat chunk clamp clone cos
cosine_similarity cumsum diag diagonal diff dot einsum eq exp eye flatten flip full full_like gather
index_select isclose isfinite isnan kron linspace log log_softmax logsumexp manual_seed masked_fill
matmul max maximum mean min minimum mm mul multinomial narrow norm ones ones_like outer permute
pow prod rand rand_like randint randn randn_like relu reshape roll sigmoid sign sin softmax sort split
sqrt square squeeze stack std sub sum t tanh tensor topk transpose tril triu unbind unsqueeze var
vstack hstack where zeros zeros_like
""".split()
_TORCH_FUNCTIONS.remove("manual_seed")  # global RNG state is shared by every user of a replica

_FUNCTIONAL = """
softmax log_softmax gelu relu silu sigmoid tanh cosine_similarity normalize layer_norm linear
cross_entropy nll_loss kl_div mse_loss pad one_hot embedding logsigmoid softplus
""".split()


def _build() -> tuple[dict[str, OpSpec], dict[Any, tuple[str, bool]], dict[str, tuple[str, str | None]]]:
    registry: dict[str, OpSpec] = {}
    by_callable: dict[Any, tuple[str, bool]] = {}  # torch callable -> (op name, swap args)
    dunders: dict[str, tuple[str, str | None]] = {}

    def add(spec: OpSpec) -> None:
        assert spec.name not in registry, spec.name
        registry[spec.name] = spec

    for name, (fn, dunder, rdunder) in _BINARY.items():
        add(OpSpec(name, "operator", fn, 2, 2))
        dunders[name] = (dunder, rdunder)
        by_callable[getattr(torch.Tensor, dunder)] = (name, False)
        if rdunder and hasattr(torch.Tensor, rdunder):
            by_callable[getattr(torch.Tensor, rdunder)] = (name, True)
    add(OpSpec(SETITEM, "operator", _setitem, 3, 3, inplace=True))
    dunders[SETITEM] = ("__setitem__", None)
    by_callable[torch.Tensor.__setitem__] = (SETITEM, False)
    for name, (fn, dunder) in _INPLACE.items():
        add(OpSpec(name, "operator", fn, 2, 2, inplace=True))
        dunders[name] = (dunder, None)
        if hasattr(torch.Tensor, dunder):
            by_callable[getattr(torch.Tensor, dunder)] = (name, False)
    for name, (fn, dunder) in _UNARY.items():
        add(OpSpec(name, "operator", fn, 1, 1))
        dunders[name] = (dunder, None)
        by_callable[getattr(torch.Tensor, dunder)] = (name, False)

    for method in _TENSOR_METHODS:
        fn = getattr(torch.Tensor, method)
        spec = OpSpec(f"Tensor.{method}", "method", fn, 1, None, inplace=method.endswith("_"))
        add(spec)
        by_callable.setdefault(fn, (spec.name, False))
    for function in _TORCH_FUNCTIONS:
        fn = getattr(torch, function)
        add(OpSpec(f"torch.{function}", "function", fn, 0, None))
        by_callable.setdefault(fn, (f"torch.{function}", False))
    for function in _FUNCTIONAL:
        fn = getattr(F, function)
        add(OpSpec(f"torch.nn.functional.{function}", "function", fn, 0, None))
        by_callable.setdefault(fn, (f"torch.nn.functional.{function}", False))

    # Special ops, run by the executor itself (fn is None where the executor needs its own state).
    add(OpSpec(READ, "special", None, 1, 1))
    add(OpSpec(WRITE, "special", None, 2, 2, inplace=True))
    add(OpSpec(SKIP, "special", None, 2, 2))
    add(OpSpec(CALL_MODULE, "special", None, 1, None))
    add(OpSpec(GRAD, "special", None, 1, 1))
    add(OpSpec(SET_GRAD, "special", None, 2, 2, inplace=True))
    add(OpSpec(BACKWARD, "special", None, 1, 1))
    add(OpSpec(STOP, "special", None, 0, 0))
    add(OpSpec(LOG, "special", None, 0, None))
    add(OpSpec(SAVE, "special", _save, 1, 1))
    add(OpSpec(GETATTR, "special", _getattr, 2, 2))
    add(OpSpec(FIELD, "special", _field, 2, 2))
    return registry, by_callable, dunders


REGISTRY, _BY_CALLABLE, OPERATOR_DUNDERS = _build()


def get(name: str) -> OpSpec:
    """The spec of op `name`; KeyError if it is not whitelisted."""
    return REGISTRY[name]


def op_for_torch_function(func: Any) -> tuple[str, bool] | None:
    """The op recording `func` (a torch function or Tensor method) and whether to swap its two args."""
    try:
        return _BY_CALLABLE.get(func)
    except TypeError:  # unhashable callables are never whitelisted
        return None
