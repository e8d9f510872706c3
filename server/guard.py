"""A pre-flight size check for ops that allocate from sizes given as data (torch.zeros(10**12)).

Without it, one request could make the server allocate more memory than the machine has. The check
runs before the op, from its arguments alone, using the op's size rule in the registry
(`OpSpec.size_rule`); ops without one make results sized by their inputs, which the executor bounds
after the fact.
"""

from __future__ import annotations

from typing import Any

import torch

from farscope.interventions.errors import LimitError
from farscope.interventions.ops import OpSpec

__all__ = ["check_allocation"]

_WIDEST_DEFAULT_ITEMSIZE = 8  # int64, the default of arange/randint over integers


def check_allocation(spec: OpSpec, args: tuple[Any, ...], kwargs: dict[str, Any], limit_bytes: int) -> None:
    """Raise `LimitError` if `spec`'s op on these arguments would allocate more than `limit_bytes`."""
    if spec.size_rule is None:
        return
    numel = spec.size_rule(args, kwargs)
    if numel is None:
        return
    dtype = kwargs.get("dtype")
    if isinstance(dtype, torch.dtype):
        itemsize = torch.empty((), dtype=dtype).element_size()
    elif args and isinstance(args[0], torch.Tensor):
        itemsize = args[0].element_size()
    else:
        itemsize = _WIDEST_DEFAULT_ITEMSIZE
    if numel * itemsize > limit_bytes:
        raise LimitError(f"{spec.name} would allocate {numel * itemsize} bytes, over the per-tensor limit of "
                         f"{limit_bytes} bytes (max_tensor_bytes)")
