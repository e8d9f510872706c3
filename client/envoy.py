"""Envoys: a client-side mirror of the server's module tree, by attribute name.

`model.model.layers[5].mlp` is an `Envoy` for the module at path `model.layers.5.mlp`. Inside a trace,
its `.output`, `.input` (first positional input) and `.inputs` (args, kwargs) are proxies, and
assigning to them replaces the module's value in the forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from farscope.interventions import ops
from farscope.interventions.errors import TraceError
from farscope.interventions.graph import HookPoint

from .proxy import Proxy
from .tracer_stack import active_tracer

__all__ = ["Envoy", "build_tree"]

# NNsight features that an envoy does not offer (yet): the error names the farscope alternative.
_NOT_YET = {
    "source": "`.source` (NNsight's access to the operations inside a module's forward) is not supported "
              "yet: hook the submodule that computes the value (e.g. self_attn.o_proj.input for the "
              "attention heads' output), or its .output/.input",
    "edit": "`.edit()` is a model-level call in farscope: `with model.edit() as edited:`",
    "scan": "model.scan() (NNsight's shape pass on fake tensors) is not supported yet: read shapes from a "
            "saved value of a real trace, or from model.config",
}


class Envoy:
    __slots__ = ("_model", "_path", "_class_name", "_children")

    def __init__(self, model: Any, path: str, class_name: str, children: dict[str, Envoy] | None = None) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_class_name", class_name)
        object.__setattr__(self, "_children", {} if children is None else children)

    @property
    def path(self) -> str:
        """The module's `named_modules()` path ("" for the root)."""
        return self._path

    @property
    def class_name(self) -> str:
        """The module's class name on the server (`LlamaDecoderLayer`)."""
        return self._class_name

    # -- hook points ---------------------------------------------------------------------------

    @property
    def output(self) -> Proxy:
        """The module's output in the current invoke (a proxy)."""
        return active_tracer(self._model).hook(ops.READ, self._path, "output")

    @property
    def input(self) -> Proxy:
        """The module's first positional input in the current invoke (a proxy)."""
        return active_tracer(self._model).hook(ops.READ, self._path, "input")

    @property
    def inputs(self) -> Proxy:
        """The module's (args, kwargs) in the current invoke (a proxy)."""
        return active_tracer(self._model).hook(ops.READ, self._path, "inputs")

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        """Run this module on values of the trace, out of order (the logit lens' `lm_head(norm(h))`).

        The call does not trigger the trace's other interventions on this module.
        """
        tracer = active_tracer(self._model)
        return tracer.record(ops.CALL_MODULE, (HookPoint(self._path, ops.CALL_POINT), *args), kwargs)

    def next(self, step: int = 1) -> Envoy:
        """NNsight's `module.next()`: what follows is recorded for a later generation step."""
        active_tracer(self._model).next(step)
        return self

    def skip(self, value: Any) -> None:
        """Replace this module's output with `value` without running the module."""
        active_tracer(self._model).hook(ops.SKIP, self._path, "output", value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ops.HOOK_POINTS:
            active_tracer(self._model).hook(ops.WRITE, self._path, name, value)
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
        if name in _NOT_YET:
            raise TraceError(_NOT_YET[name])
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


def build_tree(model: Any, modules: list[tuple[str, str]]) -> Envoy:
    """Envoys for (path, class name) pairs in `named_modules()` order; returns the root.

    `model` is the `RemoteModel` whose open trace the envoys record into.
    """
    root: Envoy | None = None
    children_of: dict[str, dict[str, Envoy]] = {}  # each envoy's children, filled as they come
    for path, class_name in modules:
        envoy = Envoy(model, path, class_name, children_of.setdefault(path, {}))
        if path:
            parent, _, name = path.rpartition(".")
            children_of[parent][name] = envoy
        else:
            root = envoy
    if root is None:
        raise ValueError("the module tree has no root (a module at path '')")
    return root
