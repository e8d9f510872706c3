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
  output (``.logits``); ``if`` / ``else`` / ``end``, the markers of a conditional block (see
  `graph`): a node between ``if(%c)`` and its ``end`` runs only when %c is true on the server;
  ``fail`` ends the request with an error (a `while` unrolled to its bound that would go on).

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
    "GETATTR", "FIELD", "SETITEM", "IF", "ELSE", "END", "FAIL",
    "OpSpec",
    "SAME", "BROADCAST", "CONCAT", "GROWS",
    "MAX_INT_BITS", "MAX_SEQUENCE_LENGTH", "MAX_TENSOR_PIECES",
    "ValueSize",
    "broadcast_numel",
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
IF = "if"  # if(cond): the nodes up to its `end` run only when cond (a bool, or a one-element tensor) is true
ELSE = "else"  # else(%if), right after %if's `end`: the nodes up to its own `end` run when %if's was false
END = "end"  # end(%if or %else): closes the innermost open block
FAIL = "fail"  # fail(message): the request fails with the client's message (a bounded loop ran past its bound)

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

# How an op's tensor output relates to its tensor inputs (OpSpec.output_size). The guard turns it into a
# cheap upper bound on the bytes the op allocates; only where that bound is over the limit does it infer
# the exact output on meta tensors, so ordinary small ops cost a few comparisons.
SAME = "same"  # no more elements than its largest tensor input (dtype aside): elementwise, reductions, views
BROADCAST = "broadcast"  # elementwise over its tensor inputs broadcast together (x[:, None] + y[None])
CONCAT = "concat"  # as many elements as its tensor inputs together (cat, stack)
GROWS = "grows"  # may outgrow its inputs, by their shapes or by numbers given as data (outer, pad, x[idx])

# Plain Python values an op makes (ints, strings, lists, tuples) are bounded as tensors are: an int by
# its bit length, a sequence by its element count, nested ones counted whole (a list holding one list
# a million times holds a million million elements, for str(), torch.tensor() or the codec): the
# numbers, tensors and characters inside, an empty sequence counting as one.
MAX_INT_BITS = 64 * 1024
MAX_SEQUENCE_LENGTH = 2**20
# A tensor in a tuple (split, unbind) costs far more than a list slot: the pieces one op makes.
MAX_TENSOR_PIECES = MAX_SEQUENCE_LENGTH // 16


@dataclass(frozen=True)
class ValueSize:
    """What an operator op on plain Python values would make, from its arguments, before it runs:
    the bit length of an int, the element count of a sequence, the tensors of a tuple, or why it
    cannot be bounded."""

    bits: int = 0
    length: int = 0
    pieces: int = 0  # tensors in a tuple (split, chunk, unbind), bounded by MAX_TENSOR_PIECES
    unbounded: str = ""  # non-empty: the op cannot be bounded before it runs, and is refused


# (args, kwargs) -> the Python value's size, or None when the op makes no unbounded Python value
ValueRule = Callable[[tuple[Any, ...], dict[str, Any]], ValueSize | None]


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
    - ``size_rule``: for ops that allocate from sizes given as data (``torch.zeros(10**12)``), or whose
      output size depends on data (``one_hot`` without ``num_classes``): the element count of the
      result computed from ``(args, kwargs)`` before running, or None when the arguments do not say.
    - ``output_size``: how its tensor output follows its tensor inputs (SAME, BROADCAST, GROWS); the
      guard bounds it from their shapes, inferring it on meta tensors where the bound is not enough.
    - ``opens_block`` / ``closes_block``: it opens (``if``, ``else``) or closes (``end``) a conditional
      block; the validator checks blocks nest, the executor skips the nodes of a block not taken.
    - ``value_rule``: for operators on plain Python values (``pow(10, 10**7)``, ``"x" * 10**10``): the
      size of what they would make, computed before running (see `ValueSize`).
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
    output_size: str = SAME
    value_rule: ValueRule | None = None
    opens_block: bool = False
    closes_block: bool = False


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


def _tensor_arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _size_of_one_hot(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # F.one_hot(x, num_classes=-1): without a class count, the classes are x.max() + 1 (one reduction)
    x, classes = _tensor_arg(args, kwargs, 0, "tensor"), _tensor_arg(args, kwargs, 1, "num_classes")
    if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex():
        return None
    if classes is None or classes == -1:
        classes = int(x.max()) + 1 if x.numel() else 0
    return x.numel() * classes if isinstance(classes, int) else None


def _size_of_repeat_interleave(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # x.repeat_interleave(repeats, dim): with a tensor of repeats, the output follows their sum
    x, repeats = _tensor_arg(args, kwargs, 0, "input"), _tensor_arg(args, kwargs, 1, "repeats")
    dim = _tensor_arg(args, kwargs, 2, "dim")
    if not isinstance(x, torch.Tensor):
        return None
    if isinstance(repeats, torch.Tensor):
        if repeats.is_floating_point() or repeats.numel() == 0:
            return None
        total = int(repeats.sum()) if repeats.numel() > 1 else int(repeats) * (
            x.numel() if dim is None else x.shape[dim])
    elif isinstance(repeats, int):
        total = repeats * (x.numel() if dim is None else x.shape[dim])
    else:
        return None
    if dim is None:
        return total
    return total * (x.numel() // max(x.shape[dim], 1))


def _size_of_diag(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # torch.diag(v, k): a vector of n makes an (n + |k|)-square matrix (more than its inputs' product)
    x, offset = _tensor_arg(args, kwargs, 0, "input"), _tensor_arg(args, kwargs, 1, "diagonal") or 0
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or not isinstance(offset, int):
        return None
    return (x.numel() + abs(offset)) ** 2


_BASIC_INDEX = (int, slice, type(None), type(Ellipsis))


def _size_of_getitem(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # x[:, -1] and the like are views, allocating nothing; x[[0, 0, ...]] or x[index_tensor] picks rows
    # (sized here: torch would first turn a long index list into a tensor, element by element, on meta
    # too); other mixes of indices are sized by the guard
    x, index = args[0], args[1] if len(args) > 1 else None
    if not isinstance(x, torch.Tensor):
        return None
    if isinstance(index, _BASIC_INDEX) or type(index) is tuple and all(isinstance(i, _BASIC_INDEX) for i in index):
        return 0
    if x.dim() == 0:
        return None
    row = x.numel() // max(x.shape[0], 1)
    if type(index) is list and all(type(i) is int for i in index):
        return len(index) * row
    if isinstance(index, torch.Tensor) and not index.is_floating_point():
        return x.numel() if index.dtype == torch.bool else index.numel() * row
    return None


def broadcast_numel(*shapes: tuple[int, ...]) -> int | None:
    """The element count of `shapes` broadcast together, or None if they do not broadcast. Plain
    arithmetic: torch.broadcast_shapes costs ten times more, on every op of the hot path."""
    ndim = max(len(s) for s in shapes)
    numel = 1
    for i in range(1, ndim + 1):
        size = 1
        for s in shapes:
            d = s[-i] if i <= len(s) else 1
            if d != 1:
                if size not in (1, d):
                    return None
                size = d
        numel *= size
    return numel


def _size_of_matmul(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # a @ b, mm, bmm: broadcast batch dimensions times rows of a times columns of b (shape arithmetic only)
    a = args[0] if args else kwargs.get("input")
    b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 1 or b.dim() < 1:
        return None
    rows = a.shape[:-1] if a.dim() > 1 else torch.Size()
    cols = b.shape[-1:] if b.dim() > 1 else torch.Size()
    batch = broadcast_numel(tuple(rows[:-1]), tuple(b.shape[:-2])) if a.dim() > 2 or b.dim() > 2 else 1
    if batch is None:
        return None  # the op raises its own error
    return batch * (rows[-1] if rows else 1) * (cols[0] if cols else 1)


def _size_of_linear(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    # F.linear(x, weight): x's rows times the weight's output features
    x, weight = _tensor_arg(args, kwargs, 0, "input"), _tensor_arg(args, kwargs, 1, "weight")
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)) or x.dim() < 1:
        return None
    return x.shape[:-1].numel() * (weight.shape[0] if weight.dim() == 2 else 1)


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
    "torch.nn.functional.one_hot": _size_of_one_hot,
    "Tensor.repeat_interleave": _size_of_repeat_interleave,
    "torch.diag": _size_of_diag,
    "getitem": _size_of_getitem,
    "matmul": _size_of_matmul,
    "torch.matmul": _size_of_matmul,
    "Tensor.matmul": _size_of_matmul,
    "torch.mm": _size_of_matmul,
    "Tensor.mm": _size_of_matmul,
    "torch.bmm": _size_of_matmul,
    "Tensor.bmm": _size_of_matmul,
    "torch.nn.functional.linear": _size_of_linear,
    "Tensor.diag": _size_of_diag,
}

# Ops whose output may outgrow their inputs: sized before they run (see SAME / BROADCAST / GROWS).
_GROWS = frozenset("""
torch.matmul Tensor.matmul matmul imatmul torch.mm Tensor.mm torch.bmm Tensor.bmm torch.einsum
torch.outer Tensor.outer torch.kron torch.diag Tensor.diag
torch.nn.functional.pad torch.nn.functional.one_hot torch.multinomial Tensor.repeat_interleave
torch.nn.functional.linear torch.nn.functional.embedding torch.index_select Tensor.index_select getitem
""".split())
_CONCAT = frozenset("torch.cat torch.stack torch.vstack torch.hstack".split())
_BROADCAST = frozenset("""
add sub mul truediv floordiv mod pow and_ or_ xor lshift rshift eq ne lt le gt ge
Tensor.add Tensor.sub Tensor.mul Tensor.div Tensor.pow Tensor.eq Tensor.ne Tensor.lt Tensor.le Tensor.gt
Tensor.ge Tensor.where Tensor.masked_fill torch.mul torch.sub torch.pow torch.eq torch.maximum torch.minimum
torch.where torch.masked_fill torch.isclose torch.allclose torch.cosine_similarity
torch.nn.functional.cosine_similarity torch.nn.functional.mse_loss torch.nn.functional.kl_div
""".split())


# Value rules: the size of what an operator makes from plain Python values, before it runs.

_SEQUENCES = (str, bytes, list, tuple)


def _int(value: Any) -> bool:
    return isinstance(value, int)  # bool included: True * "x" is a repetition too


def _bits(value: int) -> int:
    return abs(value).bit_length()


def _value_of_add(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ValueSize | None:
    a, b = args
    if isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        return ValueSize(length=len(a) + len(b))
    if _int(a) and _int(b):
        return ValueSize(bits=max(_bits(a), _bits(b)) + 1)
    return None


def _value_of_mul(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ValueSize | None:
    a, b = args
    if isinstance(a, _SEQUENCES) and _int(b):
        return ValueSize(length=len(a) * max(b, 0))
    if _int(a) and isinstance(b, _SEQUENCES):
        return ValueSize(length=len(b) * max(a, 0))
    if _int(a) and _int(b):
        return ValueSize(bits=_bits(a) + _bits(b))
    return None


def _value_of_pow(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ValueSize | None:
    base, exponent = args
    if not (_int(base) and _int(exponent)) or exponent < 0:  # a negative exponent makes a float
        return None
    if abs(base) <= 1:
        return ValueSize(bits=1)
    # log2 of the result, from the base's own log2 (exact for powers of two: 2**65535 has 65536 bits)
    return ValueSize(bits=math.floor(exponent * math.log2(abs(base))) + 1)


def _value_of_lshift(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ValueSize | None:
    a, n = args
    if _int(a) and _int(n) and n > 0:
        return ValueSize(bits=_bits(a) + n if a else 0)
    return None


def _value_of_mod(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ValueSize | None:
    # "%0999999999d" % 1 makes a gigabyte: printf-style widths are data, so formatting is refused
    if isinstance(args[0], (str, bytes)):
        return ValueSize(unbounded="string formatting with % (its widths are data) is not supported remotely")
    return None


def _value_of_tolist(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ValueSize | None:
    return ValueSize(length=args[0].numel()) if isinstance(args[0], torch.Tensor) else None


def _split_args(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> tuple[Any, Any, Any]:
    """(tensor, the split size / chunk count / None, dim) of split, chunk or unbind."""
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    second = args[1] if len(args) > 1 else kwargs.get(name) if name else None
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    return x, second, dim


def _dim_size(x: Any, dim: Any) -> int | None:
    if not isinstance(x, torch.Tensor) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        return None
    return x.shape[dim]


def _value_of_split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ValueSize | None:
    x, size, dim = _split_args(args, kwargs, "split_size_or_sections")
    if isinstance(size, (list, tuple)):
        return ValueSize(pieces=len(size))
    length = _dim_size(x, dim)
    if length is None or not isinstance(size, int) or size <= 0:
        return None
    return ValueSize(pieces=math.ceil(length / size))


def _value_of_chunk(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ValueSize | None:
    x, chunks, dim = _split_args(args, kwargs, "chunks")
    length = _dim_size(x, dim)
    if length is None or not isinstance(chunks, int):
        return None
    return ValueSize(pieces=min(max(chunks, 0), length))


def _value_of_unbind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ValueSize | None:
    x = args[0] if args else kwargs.get("input")
    length = _dim_size(x, args[1] if len(args) > 1 else kwargs.get("dim", 0))
    return None if length is None else ValueSize(pieces=length)


_VALUE_RULES: dict[str, ValueRule] = {
    "add": _value_of_add,
    "iadd": _value_of_add,
    "mul": _value_of_mul,
    "imul": _value_of_mul,
    "pow": _value_of_pow,
    "ipow": _value_of_pow,
    "lshift": _value_of_lshift,
    "mod": _value_of_mod,
    "imod": _value_of_mod,
    "Tensor.tolist": _value_of_tolist,
    "Tensor.split": _value_of_split,
    "torch.split": _value_of_split,
    "Tensor.chunk": _value_of_chunk,
    "torch.chunk": _value_of_chunk,
    "Tensor.unbind": _value_of_unbind,
    "torch.unbind": _value_of_unbind,
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

    def sizing(name: str) -> dict[str, Any]:
        output = (GROWS if name in _GROWS else BROADCAST if name in _BROADCAST else CONCAT if name in _CONCAT
                  else SAME)
        return {"output_size": output, "value_rule": _VALUE_RULES.get(name)}

    for name, (fn, dunder, rdunder) in _BINARY.items():
        add(OpSpec(name, "operator", fn, 2, 2, size_rule=_SIZE_RULES.get(name), **sizing(name)))
        dunders[name] = (dunder, rdunder)
        by_callable[getattr(torch.Tensor, dunder)] = (name, False)
        if rdunder and hasattr(torch.Tensor, rdunder):
            by_callable[getattr(torch.Tensor, rdunder)] = (name, True)
    add(OpSpec(SETITEM, "operator", _setitem, 3, 3, inplace=True))
    dunders[SETITEM] = ("__setitem__", None)
    by_callable[torch.Tensor.__setitem__] = (SETITEM, False)
    for name, (fn, dunder) in _INPLACE.items():
        add(OpSpec(name, "operator", fn, 2, 2, inplace=True, **sizing(name)))
        dunders[name] = (dunder, None)
        if hasattr(torch.Tensor, dunder):
            by_callable[getattr(torch.Tensor, dunder)] = (name, False)
    for name, (fn, dunder) in _UNARY.items():
        add(OpSpec(name, "operator", fn, 1, 1))
        dunders[name] = (dunder, None)
        by_callable[getattr(torch.Tensor, dunder)] = (name, False)

    for method in _TENSOR_METHODS:
        fn, name = getattr(torch.Tensor, method), _METHOD_PREFIX + method
        add(OpSpec(name, "method", fn, 1, None, inplace=method.endswith("_"), size_rule=_SIZE_RULES.get(name),
                   **sizing(name)))
        by_callable.setdefault(fn, (name, False))
    for function in _TORCH_FUNCTIONS:
        fn, name = getattr(torch, function), f"torch.{function}"
        add(OpSpec(name, "function", fn, 0, None, size_rule=_SIZE_RULES.get(name), **sizing(name)))
        by_callable.setdefault(fn, (name, False))
    for function in _FUNCTIONAL:
        fn = getattr(F, function)
        name = f"torch.nn.functional.{function}"
        add(OpSpec(name, "function", fn, 0, None, size_rule=_SIZE_RULES.get(name), **sizing(name)))
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
    # A condition decides for its job alone, but a shared pass gains little here: keep such graphs solo.
    add(OpSpec(IF, "special", None, 1, 1, solo=True, keywords=none, opens_block=True))
    add(OpSpec(ELSE, "special", None, 1, 1, solo=True, keywords=none, opens_block=True))
    add(OpSpec(END, "special", None, 1, 1, solo=True, keywords=none, closes_block=True))
    add(OpSpec(FAIL, "special", None, 1, 1, solo=True, keywords=none))
    for table in (_SIZE_RULES, _VALUE_RULES, _GROWS, _BROADCAST, _CONCAT):
        assert set(table) <= set(registry), set(table) - set(registry)
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
