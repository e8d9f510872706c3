"""The client's shape, read from its source with `ast`: no import cycle among its modules, no reaching
into another object's private fields, no op name spelled outside the op registry, and the layering
between the tracer stack, recording and running a request."""

from __future__ import annotations

import ast
from pathlib import Path

from farscope.interventions import ops

CLIENT = Path(__file__).resolve().parents[2] / "client"
PACKAGE = "farscope.client"
MODULES = sorted(path.stem for path in CLIENT.glob("*.py"))


def _tree(module: str) -> ast.Module:
    return ast.parse((CLIENT / f"{module}.py").read_text(), filename=f"client/{module}.py")


def _sibling_imports(module: str) -> set[str]:
    """The client modules `module` imports anywhere in its file: top level, inside functions, and under
    `if TYPE_CHECKING:` alike (a type-only import still ties the two modules together)."""
    found: set[str] = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # `from . import x` / `from .x import y`
                base = node.module or ""
            elif node.level == 0 and node.module and (node.module + ".").startswith(PACKAGE + "."):
                base = node.module[len(PACKAGE) + 1:] if node.module != PACKAGE else ""
            else:
                continue  # `from .. import` leaves the client; other packages are not siblings
            if base:
                found.add(base.split(".")[0])
            else:  # `from . import tracer_stack`: each name may be a module, else it comes from __init__
                found |= {a.name if a.name in MODULES else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE:
                    found.add("__init__")
                elif alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name[len(PACKAGE) + 1:].split(".")[0])
    found.discard(module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, as the modules along it, or None."""
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" once fully explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)) is not None:
            return found
    return None


def test_the_checks_see_every_kind_of_import() -> None:
    probe = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert _cycle(probe) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    # The client's own edges are found, so the acyclicity check below is not vacuous.
    assert {"envoy", "runner", "tracing", "transport"} <= _sibling_imports("model")
    assert "tracer_stack" in _sibling_imports("proxy")


def test_the_client_has_no_import_cycle() -> None:
    graph = {module: _sibling_imports(module) for module in MODULES}
    assert _cycle(graph) is None, f"import cycle among client modules: {' -> '.join(_cycle(graph) or [])}"


def test_layers_import_only_downwards() -> None:
    """The tracer stack depends on no other client module; proxies and envoys find their trace through
    it, not through tracing; recording hands requests to the runner, the one module (besides the
    composition root `model`) that talks to the transport."""
    graph = {module: _sibling_imports(module) for module in MODULES}
    assert graph["tracer_stack"] == set()
    assert graph["lowering"] == set()  # it reaches a trace through the proxy it is handed
    assert graph["proxy"] == {"tracer_stack", "lowering"}
    assert graph["envoy"] <= {"tracer_stack", "proxy"}
    assert "tracing" not in graph["runner"]
    users_of_transport = {module for module, imported in graph.items() if "transport" in imported}
    assert users_of_transport <= {"runner", "model"}, users_of_transport
    # Recording makes no transport call of its own: the words of the wire appear only in the runner.
    calls = {n.attr for n in ast.walk(_tree("tracing")) if isinstance(n, ast.Attribute)}
    assert not calls & {"transport", "fetch", "watch", "cancel"}, calls & {"transport", "fetch", "watch", "cancel"}


def test_only_the_lowering_reads_source() -> None:
    """STYLE.md: the one place that parses the user's source is the control-flow lowering (the runner
    only quotes the user's line in an error message)."""
    readers = set()
    for module in MODULES:
        for node in ast.walk(_tree(module)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if {"ast", "tokenize"} & set(names):
                readers.add(module)
            if isinstance(node, ast.Attribute) and node.attr in ("getsource", "getsourcelines", "settrace", "parse"):
                readers.add(module)
    assert readers == {"lowering"}, readers


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_accesses(tree: ast.Module, label: str) -> list[str]:
    """`x._name` where x is not `self`/`cls`, and `getattr`/`setattr`/`object.__setattr__` of a private
    name on such an x. Names of other modules count too: the client uses no module's private API."""
    def own(owner: ast.expr) -> bool:
        return isinstance(owner, ast.Name) and owner.id in ("self", "cls")

    def reflective(func: ast.expr) -> bool:
        return (isinstance(func, ast.Name) and func.id in ("getattr", "setattr", "hasattr", "delattr")
                or isinstance(func, ast.Attribute) and func.attr in ("__setattr__", "__getattribute__"))

    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and not own(node.value):
            found.append(f"{label}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and reflective(node.func) and len(node.args) >= 2:
            target, name = node.args[0], node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _is_private(name.value) \
                    and not own(target):
                found.append(f"{label}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_private_access_check_catches_reaching_in() -> None:
    probe = ast.parse(
        "class A:\n"
        "    def f(self, other):\n"
        "        self._mine = other._theirs\n"
        "        object.__setattr__(other, '_x', 1)\n"
        "        object.__setattr__(self, '_y', 2)\n"
        "        return getattr(self, '_mine'), getattr(other, '_z'), sys._getframe(), other.__class__\n"
    )
    found = sorted(line.split(": ", 1)[1] for line in _private_accesses(probe, "probe"))
    assert found == ["getattr(other, '_z')", "object.__setattr__(other, '_x', 1)", "other._theirs",
                     "sys._getframe"]


def test_no_object_reaches_into_another_objects_private_fields() -> None:
    found = [access for module in MODULES for access in _private_accesses(_tree(module), f"client/{module}.py")]
    assert not found, "private attributes used from outside their object:\n" + "\n".join(found)


# The wire's event kinds are protobuf oneof field names; `log` happens to be spelled like the op. NNsight's
# module-level helpers `save` and `log` are exported under those names (in `__all__`), not used as ops.
_NOT_OP_NAMES = {("transport", "log"), ("__init__", "save"), ("__init__", "log"), ("compat", "save"),
                 ("compat", "log"), ("tracing", "save")}


def test_no_op_name_is_spelled_in_the_client() -> None:
    """Op names come from `interventions.ops` (ops.READ, ops.SAVE, ...), never string literals."""
    spelled = [
        f"client/{module}.py:{node.lineno}: {node.value!r}"
        for module in MODULES
        for node in ast.walk(_tree(module))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ops.REGISTRY
        and (module, node.value) not in _NOT_OP_NAMES
    ]
    assert not spelled, "op names spelled outside the registry:\n" + "\n".join(spelled)
