"""Envoys: a client-side mirror of the server's module tree, by attribute name.

`model.model.layers[5].mlp` is an `Envoy` for the module at path `model.layers.5.mlp`. Inside a trace,
its `.output`, `.input` (first positional input) and `.inputs` (args, kwargs) are proxies, and
assigning to them replaces the module's value in the forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from farscope.interventions.graph import HookPoint

from .proxy import Proxy
from .tracing import active_tracer

if TYPE_CHECKING:
    from .model import RemoteModel

__all__ = ["Envoy", "build_tree"]

_POINTS = ("output", "input", "inputs")


class Envoy:
    __slots__ = ("_model", "_path", "_class_name", "_children")

    def __init__(self, model: RemoteModel, path: str, class_name: str) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_class_name", class_name)
        object.__setattr__(self, "_children", {})

    @property
    def path(self) -> str:
        """The module's `named_modules()` path ("" for the root)."""
        return self._path

    # -- hook points ---------------------------------------------------------------------------

    @property
    def output(self) -> Proxy:
        """The module's output in the current invoke (a proxy)."""
        return active_tracer(self._model).hook("read", self._path, "output")

    @property
    def input(self) -> Proxy:
        """The module's first positional input in the current invoke (a proxy)."""
        return active_tracer(self._model).hook("read", self._path, "input")

    @property
    def inputs(self) -> Proxy:
        """The module's (args, kwargs) in the current invoke (a proxy)."""
        return active_tracer(self._model).hook("read", self._path, "inputs")

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        """Run this module on values of the trace, out of order (the logit lens' `lm_head(norm(h))`).

        The call does not trigger the trace's other interventions on this module.
        """
        tracer = active_tracer(self._model)
        return tracer.record("call_module", (HookPoint(self._path, "forward"), *args), kwargs)

    def skip(self, value: Any) -> None:
        """Replace this module's output with `value` without running the module."""
        active_tracer(self._model).hook("skip", self._path, "output", value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _POINTS:
            active_tracer(self._model).hook("write", self._path, name, value)
            return
        raise AttributeError(f"cannot set {name!r} on {self._describe()}: only output, input and inputs "
                             "can be assigned")

    # -- the tree ------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Envoy:
        children = object.__getattribute__(self, "_children")
        if name in children:
            return children[name]
        if name.startswith("__"):
            raise AttributeError(name)
        listed = ", ".join(children) or "none"
        raise AttributeError(f"{self._describe()} has no submodule {name!r}; its children: {listed}")

    def __getitem__(self, index: int | slice) -> Any:
        items = list(self._children.values())
        if not all(key.isdigit() for key in self._children):
            raise TypeError(f"{self._describe()} is not indexable (it is not a ModuleList or Sequential)")
        return items[index]

    def __iter__(self) -> Iterator[Envoy]:
        return iter(self._children.values())

    def __len__(self) -> int:
        return len(self._children)

    def children(self) -> Iterator[Envoy]:
        return iter(self._children.values())

    def modules(self) -> Iterator[Envoy]:
        """This envoy and every envoy below it, in module order."""
        yield self
        for child in self._children.values():
            yield from child.modules()

    def _describe(self) -> str:
        return f"{self._class_name} at {self._path!r}" if self._path else f"the model ({self._class_name})"

    def __repr__(self) -> str:
        return f"Envoy({self._path or 'model'}: {self._class_name})"

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *self._children]


def build_tree(model: RemoteModel, modules: list[tuple[str, str]]) -> Envoy:
    """Envoys for (path, class name) pairs in `named_modules()` order; returns the root."""
    by_path: dict[str, Envoy] = {}
    for path, class_name in modules:
        envoy = Envoy(model, path, class_name)
        by_path[path] = envoy
        if path:
            parent, _, name = path.rpartition(".")
            by_path[parent]._children[name] = envoy
    return by_path[""]
