"""Every op's cost bounded before it is spent: tensors by bytes, plain Python values by size.

Three checks, each reading the op's properties in the registry (`OpSpec`), never its name:

- `check_allocation`, before a tensor op runs: its output's bytes, from sizes given as data
  (``size_rule``: ``torch.zeros(10**12)``, ``one_hot`` without ``num_classes``) or from its inputs
  (``output_size``). A cheap upper bound from the inputs' shapes comes first; only where that bound is
  over the limit is the output inferred exactly, by running the op on meta tensors (shape and dtype
  without data), so ordinary small ops cost a few comparisons. Views (``expand``, ``narrow``) allocate
  nothing and are not counted; a copy of one (``expand(...).clone()``) is.
- `check_python`, before an operator runs on plain Python values: the int's bit length or the
  sequence's length it would make (``value_rule``: ``pow(10, 10**7)``, ``"x" * 5_000_000_000``).
  Such ops hold the GIL and fire no hook, so nothing could stop them once started.
- `check_result` / `python_size`, after any node: a value over a bound fails the job before it can
  compound (a tensor not sharing an input's storage; an int; nested sequences counted whole).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from farscope.interventions.errors import LimitError
from farscope.interventions.graph import Ref
from farscope.interventions.ops import (
    BROADCAST,
    CONCAT,
    MAX_INT_BITS,
    MAX_SEQUENCE_LENGTH,
    MAX_TENSOR_PIECES,
    SAME,
    OpSpec,
    broadcast_numel,
)

__all__ = ["check_allocation", "check_python", "check_result", "python_size"]

_WIDEST_DEFAULT_ITEMSIZE = 8  # int64, the default of arange/randint over integers; float64
_LONG_LIST = 64  # a list argument longer than this (an index list) is sized on meta, not element by element


def _limit_error(spec: OpSpec, nbytes: int, limit_bytes: int) -> LimitError:
    return LimitError(f"{spec.name} would allocate {nbytes} bytes, over the per-tensor limit of {limit_bytes} "
                      "bytes (max_tensor_bytes)")


def check_allocation(spec: OpSpec, args: tuple[Any, ...], kwargs: dict[str, Any], limit_bytes: int) -> None:
    """Raise `LimitError` if `spec`'s op on these arguments would allocate more than `limit_bytes`."""
    if spec.size_rule is not None:
        numel = spec.size_rule(args, kwargs)
        if numel is not None:
            nbytes = numel * _itemsize(args, kwargs)
            if nbytes > limit_bytes:
                raise _limit_error(spec, nbytes, limit_bytes)
            return
    if spec.inplace or spec.kind == "special":
        return  # writes into its first argument (or only passes a value on): allocates nothing new
    if _upper_bound(spec, args, kwargs, limit_bytes) <= limit_bytes:
        return
    nbytes = _bytes_on_meta(spec, args, kwargs, limit_bytes)
    if nbytes is not None and nbytes > limit_bytes:
        raise _limit_error(spec, nbytes, limit_bytes)


def _itemsize(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    dtype = kwargs.get("dtype")
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if args and isinstance(args[0], torch.Tensor):
        return args[0].element_size()
    return _WIDEST_DEFAULT_ITEMSIZE


def _tensor_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The tensor arguments, and the tensors in list / tuple arguments (cat's inputs)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif type(value) in (list, tuple):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def _upper_bound(spec: OpSpec, args: tuple[Any, ...], kwargs: dict[str, Any], limit_bytes: int) -> int:
    """Bytes the op cannot exceed, from its inputs' shapes alone (no torch dispatch)."""
    shapes = []
    nested = bool(kwargs)
    for a in args:  # the common case, without a generator
        if isinstance(a, torch.Tensor):
            shapes.append(a.shape)
        elif type(a) in (list, tuple):
            nested = True
    if nested:
        shapes = [t.shape for t in _tensor_args(args, kwargs)]
    if not shapes:
        return 0
    numels = [s.numel() for s in shapes]
    if spec.output_size == SAME:
        elements = max(numels)
    elif spec.output_size == CONCAT:
        elements = sum(numels)
    elif spec.output_size == BROADCAST:
        if all(s == shapes[0] for s in shapes):
            elements = numels[0]
        else:
            broadcast = broadcast_numel(*shapes)
            if broadcast is None:
                return 0  # not broadcastable: the op raises its own error, allocating nothing
            elements = broadcast
    else:  # GROWS: each output element is picked by one index into each input, each number and each list
        elements = 1
        for n in numels:
            elements *= max(n, 1)
        for value in (*args, *kwargs.values()):
            if isinstance(value, int):
                elements *= 1 + abs(value)
            elif type(value) in (list, tuple):
                if len(value) > _LONG_LIST:  # an index list: sized on meta rather than element by element
                    return limit_bytes + 1
                elements *= 1 + len(value)
                for v in value:
                    if isinstance(v, int):
                        elements *= 1 + abs(v)
    return elements * _WIDEST_DEFAULT_ITEMSIZE


def _bytes_on_meta(spec: OpSpec, args: tuple[Any, ...], kwargs: dict[str, Any], limit_bytes: int) -> int | None:
    """The bytes the op's output allocates, from running it on meta tensors (shapes, no data); None when
    the op fails there for a reason of its arguments (it then runs and raises that error itself)."""
    inputs: set[int] = set()

    def to_meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            # Same strides as the input: an expanded view (stride 0) stays one, so copying it counts.
            meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
            inputs.add(id(meta))
            return meta
        if type(value) in (list, tuple):
            return type(value)(to_meta(v) for v in value)
        return value
    try:
        with torch.no_grad():
            meta_args, meta_kwargs = to_meta(args), {k: to_meta(v) for k, v in kwargs.items()}
            output = spec.fn(*meta_args, **meta_kwargs)
    except Exception as e:
        if isinstance(e, NotImplementedError) or "meta" in str(e).lower():
            # Its output depends on the data, or torch cannot infer it: refused rather than guessed.
            raise LimitError(f"{spec.name}'s output size cannot be known before it runs on inputs this large "
                             f"(up to {_upper_bound(spec, args, kwargs, limit_bytes)} bytes, over the "
                             f"per-tensor limit of {limit_bytes} bytes (max_tensor_bytes))") from None
        return None
    return sum(t.numel() * t.element_size() for t in _tensors(output)
               if id(t) not in inputs and (t._base is None or id(t._base) not in inputs))


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def check_python(spec: OpSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise `LimitError` if the operator would make an int, sequence or tuple of tensors over its bound."""
    if spec.value_rule is None:
        return
    size = spec.value_rule(args, kwargs)
    if size is None:
        return
    if size.unbounded:
        raise LimitError(f"{spec.name}: {size.unbounded}")
    if size.bits > MAX_INT_BITS:
        raise LimitError(f"{spec.name} would make an int of {size.bits} bits, over the limit of {MAX_INT_BITS} "
                         "bits for plain Python ints")
    if size.length > MAX_SEQUENCE_LENGTH:
        raise LimitError(f"{spec.name} would make a sequence of {size.length} elements, over the limit of "
                         f"{MAX_SEQUENCE_LENGTH} elements for plain Python sequences")
    if size.pieces > MAX_TENSOR_PIECES:
        raise LimitError(f"{spec.name} would make {size.pieces} tensors, over the limit of {MAX_TENSOR_PIECES} "
                         "tensors in one result")


def check_result(spec: OpSpec, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any], limit_bytes: int) -> None:
    """After the op: a tensor it allocated over the limit fails the job before it can compound. A view of
    an input (``expand``, a slice) allocated nothing, whatever its logical size."""
    if not isinstance(value, torch.Tensor) or value.nbytes <= limit_bytes or spec.inplace:
        return
    storage = value.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == storage for t in _tensor_args(args, kwargs)):
        return
    raise LimitError(f"{spec.name} produced {value.nbytes} bytes, over the per-tensor limit of {limit_bytes} "
                     "bytes (max_tensor_bytes)")


_END = object()
_CONTAINERS = (list, tuple, dict, set, frozenset)
_NUMBERS = frozenset({int, float, bool, complex, type(None)})


def python_size(value: Any, what: str, known: Mapping[int, int] | None = None) -> int:
    """The elements `value` holds, nested sequences counted whole (a list holding one list n times
    counts it n times: that is what ``str()``, ``torch.tensor()`` and the codec would walk): each
    tensor, number or other object one, a string its characters, a dict its keys too, an empty
    container one; a `Ref` counts as `known[ref.id]` (default 1).

    Raises `LimitError` (naming `what`) past MAX_SEQUENCE_LENGTH, for an int over MAX_INT_BITS, or for
    a container holding itself. The walk stops there, so it costs at most about that many steps
    whatever the value; a container held several times is walked once.
    """
    memo: dict[int, int] = {}
    frames: list[list[Any]] = []  # [container, iterator over its items, elements so far]
    open_ids: set[int] = set()
    counted = 0  # every element added anywhere: the total once the walk ends

    def add(n: int) -> None:
        nonlocal counted
        counted += n
        if counted > MAX_SEQUENCE_LENGTH:
            raise LimitError(f"{what} holds more than {MAX_SEQUENCE_LENGTH} elements (nested sequences "
                             "counted whole), over the limit for plain Python values")

    def enter(v: Any) -> int | None:
        """v's size, counted; or None after opening a frame for a container not walked before."""
        if isinstance(v, torch.Tensor):
            size = 1
        elif isinstance(v, Ref):
            size = known.get(v.id, 1) if known is not None else 1
        elif isinstance(v, (str, bytes)):
            size = max(len(v), 1)
        elif isinstance(v, _CONTAINERS):
            if id(v) in memo:
                size = memo[id(v)]
            elif id(v) in open_ids:
                raise LimitError(f"{what} holds itself (a sequence inside itself has no size)")
            elif type(v) in (list, tuple) and set(map(type, v)) <= _NUMBERS:  # rows of tolist(): no walk
                _check_ints(v, what)
                size = memo[id(v)] = max(len(v), 1)
            else:
                keys = len(v) if isinstance(v, dict) else 0
                frames.append([v, iter(v.values() if isinstance(v, dict) else v), keys])
                open_ids.add(id(v))
                add(keys)
                return None
        else:
            if isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
                _check_ints((v,), what)
            size = 1
        add(size)
        return size

    size = enter(value)
    if size is not None:
        return size
    while True:
        frame = frames[-1]
        child = next(frame[1], _END)
        if child is _END:
            frames.pop()
            open_ids.discard(id(frame[0]))
            if frame[2] == 0:  # an empty container counts one
                frame[2] = 1
                add(1)
            memo[id(frame[0])] = frame[2]
            if not frames:
                return frame[2]
            frames[-1][2] += frame[2]
            continue
        size = enter(child)
        if size is not None:
            frame[2] += size


def _check_ints(values: Any, what: str) -> None:
    if int not in set(map(type, values)):
        return
    widest = max(abs(i) for i in values if type(i) is int).bit_length()
    if widest > MAX_INT_BITS:
        raise LimitError(f"{what} holds an int of {widest} bits, over the limit of {MAX_INT_BITS} bits for "
                         "plain Python ints")
