"""Proxies: stand-ins for values that will exist on the server, recording what is done to them.

A `Proxy` wraps one graph node. Operators, tensor methods and `torch.*` functions applied to it record
new nodes (the operator methods are generated from the op registry's table, as torch.fx does with
`magic_methods`). What has no deferred meaning (iteration, `len()`) raises `TraceError`; `bool()` is
handed to `lowering`, which records a plain `if` on it as a conditional block.

`.save()` returns a `SavedTensor`: a `torch.Tensor` subclass that records like its proxy while the
trace is open and, once the trace has run, is filled in place with the server's tensor (it shares
its storage). So the name the user bound *is* a real tensor afterwards, and foreign code (tokenizers,
numpy, matplotlib) takes it; no frame is rewritten. A saved value that is not a tensor (a model
output object, a tuple, a Python number) stays reachable as `.value`, and the saved object forwards
attributes, items, iteration and operators to it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from farscope.interventions import ops
from farscope.interventions.errors import TraceError
from farscope.interventions.graph import Node, Ref, map_args

from .lowering import truth
from .tracer_stack import OpenTracer, innermost_tracer

__all__ = ["Proxy", "SavedTensor", "Shape", "to_argument", "unwrap"]

_UNSET = object()
# What a value tells about itself while recording, as NNsight's fake-tensor pass does: read off its
# meta value (shapes.py) when that is known, else recorded as before (the server computes it).
_KNOWN_ATTRIBUTES = frozenset({"shape", "ndim", "dtype"})
_KNOWN_METHODS = frozenset({"size", "dim", "numel"})
# Fields of torch's named results (`x.topk(k).indices`) that are also (sparse) Tensor attributes.
_RESULT_FIELDS = frozenset({"values", "indices"})


class Proxy:
    """A value inside a trace. `.save()` it to get `.value` after the trace has run."""

    __slots__ = ("_tracer", "_node", "_value", "_missing", "_saved")

    def __init__(self, tracer: OpenTracer, node: Node) -> None:
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_value", _UNSET)
        object.__setattr__(self, "_missing", None)
        object.__setattr__(self, "_saved", None)  # the SavedTensor standing for this value, once saved

    # -- the public surface --------------------------------------------------------------------

    @property
    def node(self) -> Node:
        return self._node

    @property
    def tracer(self) -> OpenTracer:
        """The trace that recorded this value."""
        return self._tracer

    def save(self) -> SavedTensor:
        """Send this value back when the trace runs. Returns a `SavedTensor` that records like this
        proxy inside the trace and is the value itself after it (saving twice returns the same one)."""
        if self._saved is None:
            (_recorder(self) or self._tracer).save(self)
            object.__setattr__(self, "_saved", SavedTensor(self))
        return self._saved

    @property
    def value(self) -> Any:
        """The value computed on the server (only for saved proxies, after the trace)."""
        if self._value is not _UNSET:
            return self._value
        if self._missing is not None:
            raise TraceError(f"%{self._node.id} ({self._node.op}) has no value: {self._missing}")
        if self._tracer.is_open or (self._tracer.session is not None and self._tracer.session.is_open):
            raise TraceError(f"%{self._node.id} has no value yet: values arrive when the trace (or the "
                             "session) exits")
        raise TraceError(f"%{self._node.id} ({self._node.op}) was not saved: call .save() on it inside "
                         "the trace to get its value back")

    @property
    def has_value(self) -> bool:
        """Whether the server's value has arrived (a saved proxy after its trace or session ran)."""
        return self._value is not _UNSET

    @property
    def missing(self) -> str | None:
        """Why a saved value did not come back (e.g. its generation step was never reached), or None."""
        return self._missing

    def meta(self, default: Any = _UNSET) -> Any:
        """This value's shape and dtype while recording, as a meta tensor (or a container of them): from
        the server's scan of the trace's inputs and the recorded ops, run on meta tensors here.
        Raises TraceError saying why when it cannot be known, unless a `default` is given."""
        try:
            return self._tracer.shapes.of(self._node.id)
        except TraceError as e:  # shapes.ShapeUnknown: why it cannot be known
            if default is not _UNSET:
                return default
            raise TraceError(f"the shape of %{self._node.id} is not known while recording: {e}") from None

    def set_value(self, value: Any) -> None:
        """Fill this saved proxy with the value the server computed (done when a request finishes)."""
        object.__setattr__(self, "_value", value)
        if self._saved is not None:
            self._saved.fill(value)

    def set_missing(self, why: str) -> None:
        """Mark this saved proxy as having no value, saying why (done when a request finishes)."""
        object.__setattr__(self, "_missing", why)

    def backward(self, retain_graph: bool | None = None) -> _Backward:
        """Backpropagate from this (scalar) value inside the trace; read `.grad` of any earlier value.

        Usable plainly or as `with loss.backward():` around the `.grad` reads.
        """
        if self.has_value or not self._tracer.is_open:
            raise TraceError("backward() is recorded inside a trace; after it, use the saved tensors")
        kwargs = {} if retain_graph is None else {"retain_graph": retain_graph}
        self._tracer.record(ops.BACKWARD, (self,), kwargs)
        return _Backward()

    def requires_grad_(self, requires_grad: bool = True) -> Proxy:
        """Accepted as in NNsight, and nothing to record: in a trace that calls `.backward()`, every
        activation the graph reads already carries autograd history on the server."""
        return self

    @property
    def grad(self) -> Any:
        """This value's gradient during the trace's backward pass (writable: assign to replace it)."""
        if self.has_value or not self._tracer.is_open:
            return self.value.grad
        return self._tracer.record(ops.GRAD, (self,))

    @grad.setter
    def grad(self, value: Any) -> None:
        self._tracer.record(ops.SET_GRAD, (self, value))

    # -- recording -----------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        tracer = _recorder(self)
        if self.has_value or tracer is None:
            return getattr(self.value, name)
        if name in _KNOWN_ATTRIBUTES:
            meta = self.meta(default=None)
            if isinstance(meta, torch.Tensor):
                return _known(getattr(meta, name))
        op = ops.method_op(name)
        if op is not None:
            def method(*args: Any, **kwargs: Any) -> Proxy:
                if name in _KNOWN_METHODS and not any(_is_traced(a) for a in (*args, *kwargs.values())):
                    meta = self.meta(default=None)
                    if isinstance(meta, torch.Tensor):
                        return _known(getattr(meta, name)(*args, **kwargs))
                return tracer.record(op, (self, *args), kwargs)
            return method
        if name in ops.TENSOR_ATTRIBUTES:
            return tracer.record(ops.GETATTR, (self, name))
        if hasattr(torch.Tensor, name) and name not in _RESULT_FIELDS:  # a tensor method outside the whitelist
            raise TraceError(f"Tensor.{name} is not available on the server (not in farscope's op whitelist)")
        return tracer.record(ops.FIELD, (self, name))  # a model output's field, e.g. .logits

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.has_value:
            return self._value(*args, **kwargs)
        raise TraceError(f"%{self._node.id} ({self._node.op}) is a value, not something that can be called")

    def __setattr__(self, name: str, value: Any) -> None:
        attribute = getattr(type(self), name, None)
        if isinstance(attribute, property) and attribute.fset is not None:  # `.grad = ...`
            attribute.fset(self, value)
            return
        raise TraceError(f"cannot set attribute {name!r} on a proxy")

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.has_value:
            self._value[key] = unwrap(value)
            return
        (_recorder(self) or self._tracer).record(ops.SETITEM, (self, key, value))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # torch passes its own private keywords along (F.softmax: `_stacklevel`); they only steer
        # warnings, and the validator refuses `_`-names, so they are not recorded.
        kwargs = {k: v for k, v in (kwargs or {}).items() if not k.startswith("_")}
        tracer = _open_tracer((args, kwargs))
        if tracer is None:  # only values from finished traces: behave as those values
            return func(*unwrap(args), **unwrap(kwargs))
        found = ops.op_for_torch_function(func)
        if found is None:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise TraceError(f"{name} cannot be applied to a proxy: it is not in farscope's op whitelist")
        op, swap = found
        if swap:
            args = (args[1], args[0], *args[2:])
        return tracer.record(op, args, kwargs)

    # -- what cannot be recorded ---------------------------------------------------------------

    def __bool__(self) -> bool:
        if self.has_value:
            return bool(self._value)
        return truth(self)  # `if proxy:` records a conditional block, or says why it cannot (lowering.py)

    def __iter__(self) -> Any:
        if self.has_value:
            return iter(self._value)
        raise TraceError("cannot iterate over a proxy inside a trace: Python `for` over traced values "
                         "(NNsight's traced loops) is not supported yet; index it instead (x[0], x[1], ...), "
                         "or loop over a Python range")

    def __len__(self) -> int:
        if self.has_value:
            return len(self._value)
        if _recorder(self) is None:
            raise TraceError(f"%{self._node.id} has no value: it was not saved, or its trace has not run")
        return len(self.meta())

    def __float__(self) -> float:
        return float(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __index__(self) -> int:
        return operator.index(self.value)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        array = torch.as_tensor(self.value).numpy()
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        if self.has_value:
            return repr(self._value)
        return f"<Proxy {self._node}>"

    def __format__(self, spec: str) -> str:
        return format(self.value, spec) if self.has_value else repr(self)

    __hash__ = object.__hash__


class Shape(tuple):
    """A shape known while recording: a tuple of ints equal to (and printed as) the `torch.Size` the
    server will see, which also takes NNsight's `.save()` (torch.Size cannot be subclassed). It is
    already the value: `.save()` returns it, `.value` is the `torch.Size`; in a graph it is one."""

    def save(self) -> Shape:
        return self

    @property
    def value(self) -> torch.Size:
        return torch.Size(self)

    def numel(self) -> int:
        return self.value.numel()

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        return Shape(item) if isinstance(index, slice) else item

    def __repr__(self) -> str:
        return repr(self.value)


def _known(value: Any) -> Any:
    return Shape(value) if isinstance(value, torch.Size) else value


class _Backward:
    """Returned by `Proxy.backward()`, so that `with loss.backward():` reads as in NNsight."""

    def __enter__(self) -> _Backward:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


# Reached on a SavedTensor itself, never forwarded: its bookkeeping and the proxy's public state.
_SAVED_OWN = frozenset({"proxy", "value", "has_value", "missing", "node", "tracer", "fill",
                        "set_value", "set_missing"})


class SavedTensor(torch.Tensor):
    """What `proxy.save()` returns: a proxy while its trace records, the saved tensor after it.

    It starts as an empty tensor. While its trace (or a later trace of its session) records, every
    attribute, operator and `torch.*` call goes to the proxy and records a node. When the request
    finishes, `fill` points its data at the server's tensor (shared storage, dtype and shape), so the
    object the user holds is that tensor from then on. A non-tensor value stays in `.value`, and the
    saved object forwards what is done to it there.
    """

    @staticmethod
    def __new__(cls, proxy: Proxy) -> SavedTensor:
        return cls._make_subclass(cls, torch.empty(0))

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        object.__setattr__(self, "_proxy", proxy)

    # -- its own state ---------------------------------------------------------------------------

    @property
    def proxy(self) -> Proxy:
        return object.__getattribute__(self, "_proxy")

    @property
    def value(self) -> Any:
        """The value computed on the server (as `Proxy.value`: a clear error while it has none)."""
        return self.proxy.value

    @property
    def has_value(self) -> bool:
        return self.proxy.has_value

    @property
    def missing(self) -> str | None:
        return self.proxy.missing

    @property
    def node(self) -> Node:
        return self.proxy.node

    @property
    def tracer(self) -> OpenTracer:
        return self.proxy.tracer

    def save(self) -> SavedTensor:
        return self.proxy.save()

    def set_value(self, value: Any) -> None:
        self.proxy.set_value(value)

    def set_missing(self, why: str) -> None:
        self.proxy.set_missing(why)

    def fill(self, value: Any) -> None:
        """Become `value` (a tensor: share its data; anything else: forward to it)."""
        if isinstance(value, torch.Tensor):
            super().__setattr__("data", value.detach())

    def _recording(self) -> bool:
        proxy = self.proxy
        return not proxy.has_value and _recorder(proxy) is not None

    def _tensor_value(self) -> bool:
        proxy = self.proxy
        return proxy.has_value and isinstance(proxy.value, torch.Tensor)

    # -- forwarding ------------------------------------------------------------------------------

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name in _SAVED_OWN:
            return super().__getattribute__(name)
        if self._tensor_value():
            return super().__getattribute__(name)
        proxy = self.proxy
        return getattr(proxy.value if proxy.has_value else proxy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and self._recording():
            setattr(self.proxy, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _open_tracer((args, kwargs)) is not None:
            return Proxy.__torch_function__(func, types, _as_proxies(args), _as_proxies(kwargs))
        values, named = unwrap(args), unwrap(kwargs)
        name = getattr(func, "__name__", "")
        if values and not isinstance(values[0], torch.Tensor) and name.startswith("__") \
                and name.endswith("__"):  # an operator on a saved non-tensor value: the value's own
            return getattr(values[0], name)(*values[1:], **named)
        return func(*values, **named)

    def _forward(self, name: str, *args: Any) -> Any:
        """`name` (a dunder) done by the proxy while recording, else by the value."""
        proxy = self.proxy
        return getattr(proxy if not proxy.has_value else proxy.value, name)(*args)

    def __bool__(self) -> bool:
        return self._forward("__bool__")

    def __iter__(self) -> Any:
        return self._forward("__iter__")

    def __len__(self) -> int:
        return self._forward("__len__")

    def __contains__(self, item: Any) -> bool:
        return self._forward("__contains__", item)

    def __getitem__(self, key: Any) -> Any:
        if self._tensor_value():
            return super().__getitem__(key)
        return self._forward("__getitem__", _as_proxies(key))

    def __repr__(self) -> str:
        return repr(self.proxy)

    def __format__(self, spec: str) -> str:
        return format(self.proxy, spec)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.value.__reduce_ex__(protocol)  # pickles (and deep-copies) as the plain value

    __hash__ = torch.Tensor.__hash__


def _is_traced(value: Any) -> bool:
    return isinstance(value, (Proxy, SavedTensor))


def _as_proxies(value: Any) -> Any:
    return map_args(value, lambda v: v.proxy if isinstance(v, SavedTensor) else v)


def unwrap(value: Any) -> Any:
    """Proxies of finished traces replaced by their values (nested)."""
    return map_args(value, lambda v: v.value if isinstance(v, (Proxy, SavedTensor)) else v)


def to_argument(value: Any, tracer: OpenTracer) -> Any:
    """A recorded argument: proxies of this trace become `Ref`s; finished ones become their values."""
    def convert(v: Any) -> Any:
        if isinstance(v, SavedTensor):
            v = v.proxy
        if isinstance(v, Proxy):
            owner = v.tracer
            if owner is tracer or (owner.session is not None and owner.session is tracer.session):
                return Ref(v.node.id)
            if v.has_value:
                return v.value
            raise TraceError(f"%{v.node.id} belongs to another trace and was not saved there")
        if isinstance(v, torch.nn.Parameter):
            return v.detach()
        return v
    return map_args(_sizes(value), convert)


def _sizes(value: Any) -> Any:
    """Each `Shape` in a nested argument made the `torch.Size` it stands for (a leaf of the graph)."""
    if isinstance(value, Shape):
        return value.value
    if isinstance(value, list | tuple) and not isinstance(value, torch.Size) and any(
            isinstance(v, list | tuple | dict) for v in value):
        return type(value)(_sizes(v) for v in value) if type(value) in (list, tuple) else value
    if isinstance(value, dict):
        return {k: _sizes(v) for k, v in value.items()}
    return value


def _recorder(proxy: Proxy) -> OpenTracer | None:
    """The open trace that records what is done to `proxy`: its own, or, for a value of an earlier
    trace of a session, the session's trace open now (values flow between a session's traces), or,
    between two traces of a session, the one that ended last."""
    tracer = proxy.tracer
    if tracer.is_open:
        return tracer
    session = tracer.session
    if session is None or not session.is_open:
        return None
    current = innermost_tracer()
    if current is not None:
        return current if current.session is session else None
    return session.between  # between two traces of the session: session-level nodes


def _open_tracer(value: Any) -> OpenTracer | None:
    found: list[OpenTracer] = []

    def visit(v: Any) -> Any:
        if isinstance(v, SavedTensor):
            v = v.proxy
        if isinstance(v, Proxy) and not found:
            tracer = _recorder(v)
            if tracer is not None:
                found.append(tracer)
        return v
    map_args(value, visit)
    return found[0] if found else None


def _binary(op: str, fn: Any, reflected: bool) -> Any:
    def method(self: Proxy, other: Any) -> Any:
        tracer = _recorder(self)
        if self.has_value or tracer is None:
            return fn(other, self.value) if reflected else fn(self.value, unwrap(other))
        args = (other, self) if reflected else (self, other)
        return tracer.record(op, args)
    return method


def _unary(op: str, fn: Any) -> Any:
    def method(self: Proxy) -> Any:
        tracer = _recorder(self)
        if self.has_value or tracer is None:
            return fn(self.value)
        return tracer.record(op, (self,))
    return method


for _op, (_dunder, _rdunder) in ops.OPERATOR_DUNDERS.items():
    _spec = ops.REGISTRY[_op]
    if _op == ops.SETITEM:
        continue
    if _spec.min_args == 1:
        setattr(Proxy, _dunder, _unary(_op, _spec.fn))
    else:
        setattr(Proxy, _dunder, _binary(_op, _spec.fn, reflected=False))
        if _rdunder:
            setattr(Proxy, _rdunder, _binary(_op, _spec.fn, reflected=True))


def _saved_operator(dunder: str) -> Any:
    """A SavedTensor operator: the proxy's while its trace records, the tensor's after it, or, for a
    saved non-tensor value (a Python number), the value's own."""
    tensor_method = getattr(torch.Tensor, dunder)

    def method(self: SavedTensor, *args: Any) -> Any:
        proxy = self.proxy
        if not proxy.has_value and _recorder(proxy) is not None:
            return getattr(proxy, dunder)(*args)
        if proxy.has_value and not isinstance(proxy.value, torch.Tensor):
            return getattr(proxy.value, dunder)(*unwrap(args))
        return tensor_method(self, *args)
    return method


for _dunder, _rdunder in ops.OPERATOR_DUNDERS.values():
    for _name in (_dunder, _rdunder):
        if _name and _name not in ("__getitem__", "__setitem__") and hasattr(torch.Tensor, _name):
            setattr(SavedTensor, _name, _saved_operator(_name))
for _name in ("__int__", "__float__", "__index__"):
    setattr(SavedTensor, _name, _saved_operator(_name))
