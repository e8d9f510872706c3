"""Shapes without compute: every module's output / input / inputs shapes and dtypes for given inputs.

A client asks for them while it records (`x.shape` inside a trace, `model.scan(...)`). The scan runs
the model's own forward code (trusted server code) on a copy of the model whose parameters and
buffers are meta tensors: no data is allocated and no arithmetic is done, only shapes and dtypes
propagate. The client sends nothing but its inputs (text or token ids, checked by the validator and
the replica's `max_input_tokens`); the document that comes back is data: for each module path, for
each hook point, a tree mirroring the value (tuples, lists, dicts and model outputs as they are) with
every tensor replaced by a `TensorMeta` record of its shape and dtype.

The meta copy is a separate module tree, so the hooks it needs never touch the served model, which
may be running a job meanwhile. It is built once per replica, under the replica's lock (so that no
job's hooks are on the model while it is copied), and used by one scan at a time. Results are cached
per input shape (rows of each invoke and their lengths): shapes depend on nothing else.

Hooking an attention module's `attn_probs` switches the pass to eager attention (attention.py), which
changes the attention modules' second output (None under sdpa). So a pass that would otherwise not
call them is scanned twice: first with `attn_probs` left alone (what a trace that does not read them
sees), then only for the `attn_probs` shapes.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections import OrderedDict
from collections.abc import Hashable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from farscope.interventions import codec
from farscope.interventions.errors import FarscopeError, LimitError, ValidationError
from farscope.interventions.graph import Segment

from .attention import AttentionHookPoint
from .inputs import build_batch, rows_of

__all__ = ["Scanner", "TensorMeta", "ScanDocument", "ROWS", "LENGTH", "MODULES"]

# Distinct input shapes remembered per model: an entry is a few KiB for a small model, some hundred
# KiB for one of a thousand modules.
CACHE_ENTRIES = 64
# A tensor made from sizes alone (arange, ones, full) is real when at most this many elements: such
# tensors are positions and masks, whose values the model's own checks read.
REAL_FACTORY_ELEMENTS = 1 << 22
_META = torch.device("meta")
ROWS = "rows"  # the document's keys: each invoke's [start, stop) rows of the batch,
LENGTH = "length"  # the padded length of its rows,
MODULES = "modules"  # and {module path: {point: shape tree}}

ScanDocument = dict[str, Any]


class TensorMeta(dict):
    """A tensor in a scan document: its shape and dtype (travels as a record named `TensorMeta`)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(shape=torch.Size(tensor.shape), dtype=tensor.dtype)


@functools.cache
def _record_type(name: str) -> type[dict]:
    """A plain dict type named `name`: the codec sends a dict subclass as a Record of its type's name."""
    return type(name, (dict,), {})


def _describe(value: Any, depth: int = 0) -> Any:
    """`value` with each tensor replaced by its `TensorMeta`; containers kept, other objects as they are
    (the codec shows a KV cache or a config as an opaque stand-in)."""
    if depth > 32:
        return None
    if isinstance(value, torch.Tensor):
        return TensorMeta(value)
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(_describe(v, depth + 1) for v in value)
    if isinstance(value, list):
        return [_describe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        described = {k: _describe(v, depth + 1) for k, v in value.items()}
        if type(value) is dict:
            return described
        return _record_type(type(value).__name__)(described)  # a model output travels as a Record of its name
    if value is None or isinstance(value, bool | int | float | str | torch.Size | torch.dtype):
        return value
    return value  # an opaque stand-in on the wire


def _meta_copy(model: nn.Module) -> nn.Module:
    """`model` with meta parameters and buffers, and none of the hooks or patched forwards a running
    job may have put on it."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=False) if isinstance(tensor, nn.Parameter) else meta
    copied = copy.deepcopy(model, memo)
    for module in copied.modules():
        module.__dict__.pop("forward", None)  # an executor's patched forward, bound to the original
        module.__dict__.pop("_hf_hook", None)  # accelerate's device placement: nothing to place
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                      "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                      "_backward_pre_hooks"):
            found = getattr(module, hooks, None)
            if found is not None:
                found.clear()
    copied.eval()
    return copied


class _MetaWhereWeights(TorchDispatchMode):
    """Meta where a value depends on the weights, real where it depends only on the inputs.

    Transformers' forward code reads input-derived values as data (is there padding? are positions
    packed?), which meta tensors cannot answer. So tensors computed only from the inputs (token ids,
    masks, positions, and small tensors made from sizes) stay real CPU tensors, and anything touching a
    (meta) weight is meta: the data-dependent checks see real values, and nothing of the model's size
    is computed or allocated. A mode is per thread: the served model's passes never see it.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "meta" and (
                not tensors or not all(t.is_meta for t in tensors)):
            # an input-derived value moved to the model's (meta) device, or made there from sizes alone
            if not tensors:
                made = func(*args, **kwargs)
                if not isinstance(made, torch.Tensor) or made.numel() > REAL_FACTORY_ELEMENTS:
                    return made
            return func(*args, **{**kwargs, "device": torch.device("cpu")})
        if any(t.is_meta for t in tensors):
            args, kwargs = pytree.tree_map(
                lambda t: t.to(_META) if isinstance(t, torch.Tensor) and not t.is_meta else t, (args, kwargs))
        return func(*args, **kwargs)


class _InputsOnCpu:
    """The meta copy as `build_batch` reads it, placing the inputs on the CPU: they stay real."""

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config
        self.forward = model.forward
        embeddings = model.get_input_embeddings()
        self._embeddings = SimpleNamespace(num_embeddings=embeddings.num_embeddings, weight=torch.empty(0))

    def get_input_embeddings(self) -> SimpleNamespace:
        return self._embeddings


class _Recorder:
    """Forward hooks on the meta copy that keep each module's first call's values, described."""

    def __init__(self, model: nn.Module, paths: dict[nn.Module, str], only: type | None, skip: type | None) -> None:
        self.found: dict[str, dict[str, Any]] = {}
        self.handles: list[Any] = []
        for module, path in paths.items():
            if (only is not None and not isinstance(module, only)) or (skip is not None and isinstance(module, skip)):
                continue
            self.handles.append(module.register_forward_pre_hook(self._pre(path), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(path), with_kwargs=True))

    def _pre(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if path in self.found:
                return
            first = args[0] if args else (next(iter(kwargs.values())) if kwargs else None)
            self.found[path] = {"inputs": _describe((args, kwargs)), "input": _describe(first)}
        return hook

    def _post(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            point = self.found.setdefault(path, {})
            point.setdefault("output", _describe(output))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Scanner:
    """Scans of one replica's model, cached by input shape."""

    def __init__(self, replica: Any) -> None:
        self.replica = replica
        self._meta: nn.Module | None = None
        self._paths: dict[nn.Module, str] = {}
        self._lock = threading.Lock()  # one scan at a time on the meta copy (its hooks are shared)
        self._cache: OrderedDict[Hashable, bytes] = OrderedDict()

    def scan(self, segment: Segment) -> bytes:
        """The encoded scan document (see `ScanDocument`) of a validated segment's inputs."""
        if segment.mode != "trace":
            raise ValidationError("a scan runs one forward pass: its mode must be 'trace'")
        if not segment.invokes:
            raise ValidationError("a scan needs at least one input (invoke)")
        tokenizer = self.replica.tokenizer
        lengths = tuple(tuple(len(row) for row in rows_of(tokenizer, value)) for value in segment.invokes)
        with self._lock:
            cached = self._cache.get(lengths)
            if cached is not None:
                self._cache.move_to_end(lengths)
                return cached
            document = self._run(segment)
            self._cache[lengths] = document
            if len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
            return document

    def cached(self, segment: Segment) -> bool:
        """Whether this segment's scan is already known (a cheap call, not charged to the caller's rate)."""
        try:
            lengths = tuple(tuple(len(row) for row in rows_of(self.replica.tokenizer, v)) for v in segment.invokes)
        except Exception:
            return False
        with self._lock:
            return lengths in self._cache

    def _model(self) -> nn.Module:
        if self._meta is None:
            with self.replica._lock:  # no job's hooks on the model while it is copied
                self._meta = _meta_copy(self.replica.model)
            self._paths = {module: path for path, module in self._meta.named_modules()}
        return self._meta

    def _run(self, segment: Segment) -> bytes:
        model = self._model()
        batch = build_batch(_InputsOnCpu(model), self.replica.tokenizer, segment.invokes, "trace",
                            max_tokens=self.replica.limits.max_input_tokens)
        found = self._pass(model, batch.inputs, skip=AttentionHookPoint)
        if any(isinstance(m, AttentionHookPoint) and p not in found for m, p in self._paths.items()):
            try:
                found.update(self._pass(model, batch.inputs, only=AttentionHookPoint))
            except LimitError:  # eager probabilities over max_tensor_bytes: a trace could not read them either
                pass
        document: ScanDocument = {ROWS: [list(r) for r in batch.rows],
                                  LENGTH: int(batch.inputs["input_ids"].shape[1]), MODULES: found}
        encoded, blobs = codec.encode_results(document)
        if blobs:
            raise AssertionError("a scan document holds no tensor data")
        return encoded

    def _pass(self, model: nn.Module, inputs: dict[str, Any], *, only: type | None = None,
              skip: type | None = None) -> dict[str, dict[str, Any]]:
        recorder = _Recorder(model, self._paths, only, skip)
        try:
            with torch.no_grad(), _MetaWhereWeights():
                model(**inputs)
        except FarscopeError:
            raise
        except Exception as e:  # a forward that meta tensors cannot run: say so, as data
            raise FarscopeError(f"this model cannot be scanned on meta tensors ({type(e).__name__}: "
                                f"{str(e)[:300]}); read shapes from a saved value of a real trace instead") from None
        finally:
            recorder.remove()
        return recorder.found
