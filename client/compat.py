"""NNsight's module-level helpers, so that `import farscope as nnsight` keeps a script's spelling.

`save(x)` is `x.save()` for traced values and keeps containers whose traced items come back;
`list()` and `dict()` are such containers (NNsight 0.4's `nnsight.list()`; 0.8 writes `list().save()`);
`apply(fn, *args)` records `fn` applied to traced values (its body is recorded op by op, so it may use
only what a proxy records); `log(*values)` prints values on the client while the job runs.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

from farscope.interventions import ops
from farscope.interventions.errors import TraceError

from . import tracer_stack
from .tracing import SavedDict, SavedList, save

__all__ = ["save", "list", "dict", "apply", "log"]


def _tracer(what: str) -> tracer_stack.OpenTracer:
    tracer = tracer_stack.innermost_tracer()
    if tracer is None:
        raise TraceError(f"{what}() is used inside `with model.trace(...)` (or generate)")
    return tracer


def list(items: Any = ()) -> SavedList:  # noqa: A001 - NNsight's name
    """A list whose traced items come back as values when the trace ends (`nnsight.list()`)."""
    kept = SavedList(builtins.list(items))
    _tracer("farscope.list").keep(kept)
    return kept


def dict(*args: Any, **kwargs: Any) -> SavedDict:  # noqa: A001 - NNsight's name
    """A dict whose traced values come back as values when the trace ends (`nnsight.dict()`)."""
    kept = SavedDict(*args, **kwargs)
    _tracer("farscope.dict").keep(kept)
    return kept


def apply(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` recorded in the trace: each operation it does on traced values becomes a
    node (farscope sends no code, so `fn` may use only recordable operations)."""
    _tracer("farscope.apply")
    return fn(*args, **kwargs)


def log(*values: Any) -> None:
    """Print `values` on the client while the job runs (computed on the server), as `tracer.log`."""
    _tracer("farscope.log").record(ops.LOG, values)
