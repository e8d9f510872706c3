"""A pre-flight size check for ops that allocate from sizes given as data (torch.zeros(10**12)).

Without it, one request could make the server allocate more memory than the machine has. The check
runs before the op, from its arguments alone; ops whose size follows their inputs' sizes are bounded
by those inputs.
"""

from __future__ import annotations

import math

import torch

from farscope.interventions.errors import LimitError

__all__ = ["check_allocation"]

_FROM_SIZE = {"torch.zeros", "torch.ones", "torch.rand", "torch.randn", "torch.full", "torch.empty"}
_NEW = {"Tensor.new_zeros", "Tensor.new_ones", "Tensor.new_full"}


def _size(args: tuple) -> int | None:
    if args and isinstance(args[0], (tuple, list, torch.Size)):
        args = tuple(args[0])
    if not args or not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        return None
    return math.prod(max(a, 0) for a in args)


def _numel(op: str, args: tuple, kwargs: dict) -> int | None:
    if op in _FROM_SIZE:
        if "size" in kwargs:
            return _size((kwargs["size"],))
        return _size(args[:1] if op == "torch.full" else args)
    if op in _NEW:
        return _size(args[1:2] if op == "Tensor.new_full" else args[1:])
    if op == "torch.randint":
        size = kwargs.get("size", args[-1] if args else None)
        return _size((size,)) if size is not None else None
    if op == "torch.eye":
        n = args[0] if args else 0
        m = args[1] if len(args) > 1 and isinstance(args[1], int) else n
        return n * m if isinstance(n, int) and isinstance(m, int) else None
    if op in ("torch.arange", "torch.linspace"):
        numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if op == "torch.linspace":
            steps = kwargs.get("steps", numbers[2] if len(numbers) > 2 else None)
            return int(steps) if isinstance(steps, (int, float)) and math.isfinite(steps) else None
        if not numbers:
            return None
        start, end = (0, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])
        step = numbers[2] if len(numbers) > 2 else kwargs.get("step", 1)
        if not all(math.isfinite(x) for x in (start, end, step)) or step == 0:
            return None
        return max(0, math.ceil((end - start) / step))
    if op == "Tensor.repeat" and args and isinstance(args[0], torch.Tensor):
        factors = _size(args[1:])
        return None if factors is None else args[0].numel() * factors
    return None


def check_allocation(op: str, args: tuple, kwargs: dict, limit_bytes: int) -> None:
    """Raise `LimitError` if `op(*args, **kwargs)` would allocate more than `limit_bytes`."""
    numel = _numel(op, args, kwargs)
    if numel is None:
        return
    dtype = kwargs.get("dtype")
    if isinstance(dtype, torch.dtype):
        itemsize = torch.empty((), dtype=dtype).element_size()
    elif args and isinstance(args[0], torch.Tensor):
        itemsize = args[0].element_size()
    else:
        itemsize = 8  # the widest default (int64 for arange/randint)
    if numel * itemsize > limit_bytes:
        raise LimitError(f"{op} would allocate {numel * itemsize} bytes, over the per-request limit of "
                         f"{limit_bytes} bytes (max_saved_bytes)")
