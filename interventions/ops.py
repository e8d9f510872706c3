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

What other modules need to know about an op is a field of its `OpSpec` (where it runs, whether it
may share a batched pass, which keywords it takes, how much it allocates), read there, never
re-derived from its name. Adding an op is one entry here plus one test in
``tests/interventions/test_ops.py``.
"""

from __future__ import annotations

import math
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
    "ROOT_POINTS",
    "CALL_POINT",
    "OPERATOR_DUNDERS",
    "method_op",
    "op_for_torch_function",
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

# Attributes that may be read off a value with the `getattr` op. Anything else is refused, so a
# graph can never walk into `__class__`, `__globals__` or a module's internals.
TENSOR_ATTRIBUTES = frozenset(
    {"shape", "dtype", "ndim", "T", "mT", "H", "real", "imag", "requires_grad", "is_leaf"}
)


# (args, kwargs) -> element count of the result, or None when the arguments do not say
SizeRule = Callable[[tuple[Any, ...], dict[str, Any]], int | None]


@dataclass(frozen=True)
class OpSpec:
    """One whitelisted op: its wire name, kind, positional arity, the callable the server runs, and
    the properties the validator, executor, allocation guard and co-batching read.

    - ``inplace``: it mutates its first argument (or, for ``write``/``set_grad``, the hooked value).
    - ``hook_points``: its first argument is a module `HookPoint`, one of these points.
    - ``hooked``: it runs when its module hook point fires during the forward pass (so a segment that
      has one needs a forward pass).
    - ``on_gradient``: its first argument is a value whose gradient it reads or replaces; it runs
      when that gradient is computed during backward.
    - ``gradient_target``: its first argument must be a reference to the value whose gradient it
      concerns (a gradient, or the loss of ``backward``); gradients exist only in traces.
    - ``solo``: its effect reaches beyond its own invoke's rows, or ends or reports on the whole
      pass, so a graph holding it never shares a batched forward pass with other requests.
    - ``keywords``: the keywords it accepts; None: any (they are passed on to ``fn`` or the module).
    - ``size_rule``: for ops that allocate from sizes given as data (``torch.zeros(10**12)``): the
      element count of the result computed from ``(args, kwargs)`` before running, or None when the
      arguments do not say. Ops without a rule are sized by their inputs.
    """

    name: str
    kind: str
    fn: Callable[..., Any] | None
    min_args: int
    max_args: int | None  # None: variadic
    inplace: bool = False
    hook_points: tuple[str, ...] = ()
    hooked: bool = False
    on_gradient: bool = False
    gradient_target: bool = False
    solo: bool = False
    keywords: frozenset[str] | None = None
    size_rule: SizeRule | None = None


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


# Size rules of the ops that allocate from sizes given as data. Plain arithmetic on the arguments,
# before the op runs; None where the arguments are not plain sizes (torch then raises, or the result
# is bounded after the fact by the executor).


def _dims(args: tuple[Any, ...]) -> int | None:
    """The element count of a size given as ``(2, 3)`` or ``((2, 3),)``."""
    if args and isinstance(args[0], (tuple, list, torch.Size)):
        args = tuple(args[0])
    if not args or not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        return None
    return math.prod(max(a, 0) for a in args)


def _size_is_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # torch.zeros(2, 3), torch.zeros((2, 3)), torch.zeros(size=(2, 3))
    return _dims((kwargs["size"],)) if "size" in kwargs else _dims(args)


def _size_is_first_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # torch.full((2, 3), value)
    return _dims((kwargs["size"],)) if "size" in kwargs else _dims(args[:1])


def _size_after_self(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # x.new_zeros(2, 3), x.new_zeros((2, 3)), x.new_zeros(size=(2, 3))
    return _dims((kwargs["size"],)) if "size" in kwargs else _dims(args[1:])


def _size_of_new_full(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # x.new_full((2, 3), value)
    return _dims((kwargs["size"],)) if "size" in kwargs else _dims(args[1:2])


def _size_of_randint(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # torch.randint([low,] high, size): the size comes last
    size = kwargs.get("size", args[-1] if args else None)
    return _dims((size,)) if size is not None else None


def _size_of_eye(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    n = args[0] if args else 0
    m = args[1] if len(args) > 1 and isinstance(args[1], int) else n
    return n * m if isinstance(n, int) and isinstance(m, int) else None


def _numbers(args: tuple[Any, ...]) -> list[int | float]:
    return [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]


def _size_of_arange(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    numbers = _numbers(args)
    if not numbers:
        return None
    start, end = (0, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])
    step = numbers[2] if len(numbers) > 2 else kwargs.get("step", 1)
    if not all(math.isfinite(x) for x in (start, end, step)) or step == 0:
        return None
    return max(0, math.ceil((end - start) / step))


def _size_of_linspace(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    numbers = _numbers(args)
    steps = kwargs.get("steps", numbers[2] if len(numbers) > 2 else None)
    return int(steps) if isinstance(steps, (int, float)) and math.isfinite(steps) else None


def _size_of_repeat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # x.repeat(*factors): x's elements times the product of the factors
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    factors = _dims(args[1:])
    return None if factors is None else args[0].numel() * factors


_SIZE_RULES: dict[str, SizeRule] = {
    "torch.zeros": _size_is_args,
    "torch.ones": _size_is_args,
    "torch.rand": _size_is_args,
    "torch.randn": _size_is_args,
    "torch.full": _size_is_first_arg,
    "torch.randint": _size_of_randint,
    "torch.eye": _size_of_eye,
    "torch.arange": _size_of_arange,
    "torch.linspace": _size_of_linspace,
    "Tensor.new_zeros": _size_after_self,
    "Tensor.new_ones": _size_after_self,
    "Tensor.new_full": _size_of_new_full,
    "Tensor.repeat": _size_of_repeat,
}


# name: (callable, dunder, reflected dunder or None)
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
# name: (callable, dunder); the in-place operators have no reflected form
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
# name: (callable, dunder)
_UNARY = {
    "neg": (operator.neg, "__neg__"),
    "pos": (operator.pos, "__pos__"),
    "abs": (operator.abs, "__abs__"),
    "invert": (operator.invert, "__invert__"),
}

_METHOD_PREFIX = "Tensor."  # a Tensor method's op is "Tensor.<method>"

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
        fn, name = getattr(torch.Tensor, method), _METHOD_PREFIX + method
        add(OpSpec(name, "method", fn, 1, None, inplace=method.endswith("_"), size_rule=_SIZE_RULES.get(name)))
        by_callable.setdefault(fn, (name, False))
    for function in _TORCH_FUNCTIONS:
        fn, name = getattr(torch, function), f"torch.{function}"
        add(OpSpec(name, "function", fn, 0, None, size_rule=_SIZE_RULES.get(name)))
        by_callable.setdefault(fn, (name, False))
    for function in _FUNCTIONAL:
        fn = getattr(F, function)
        add(OpSpec(f"torch.nn.functional.{function}", "function", fn, 0, None))
        by_callable.setdefault(fn, (f"torch.nn.functional.{function}", False))

    # Special ops, run by the executor itself (fn is None where the executor needs its own state).
    # A hook op names the invoke whose rows it concerns and the module's call (0: first); a read may
    # be `optional` (a cache of every module: a module that never runs is left out, not an error).
    at_hook = frozenset({"invoke", "call"})
    none = frozenset[str]()
    add(OpSpec(READ, "special", None, 1, 1, hook_points=HOOK_POINTS + ROOT_POINTS, hooked=True,
               keywords=at_hook | {"optional"}))
    add(OpSpec(WRITE, "special", None, 2, 2, inplace=True, hook_points=HOOK_POINTS, hooked=True,
               keywords=at_hook))
    add(OpSpec(SKIP, "special", None, 2, 2, hook_points=("output",), hooked=True, solo=True, keywords=at_hook))
    add(OpSpec(CALL_MODULE, "special", None, 1, None, hook_points=(CALL_POINT,)))
    add(OpSpec(GRAD, "special", None, 1, 1, on_gradient=True, gradient_target=True, solo=True, keywords=none))
    add(OpSpec(SET_GRAD, "special", None, 2, 2, inplace=True, on_gradient=True, gradient_target=True,
               solo=True, keywords=none))
    add(OpSpec(BACKWARD, "special", None, 1, 1, gradient_target=True, solo=True,
               keywords=frozenset({"retain_graph"})))
    add(OpSpec(STOP, "special", None, 0, 0, solo=True, keywords=none))
    add(OpSpec(LOG, "special", None, 0, None, solo=True, keywords=none))
    add(OpSpec(SAVE, "special", _save, 1, 1))
    add(OpSpec(GETATTR, "special", _getattr, 2, 2))
    add(OpSpec(FIELD, "special", _field, 2, 2))
    assert set(_SIZE_RULES) <= set(registry), set(_SIZE_RULES) - set(registry)
    return registry, by_callable, dunders


REGISTRY, _BY_CALLABLE, OPERATOR_DUNDERS = _build()


def op_for_torch_function(func: Any) -> tuple[str, bool] | None:
    """The op recording `func` (a torch function or Tensor method) and whether to swap its two args."""
    try:
        return _BY_CALLABLE.get(func)
    except TypeError:  # unhashable callables are never whitelisted
        return None


def method_op(name: str) -> str | None:
    """The op recording Tensor method `name` (``x.softmax(...)``), or None if it is not whitelisted."""
    op = _METHOD_PREFIX + name
    return op if op in REGISTRY else None
