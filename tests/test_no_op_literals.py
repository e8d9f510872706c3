"""No op name is spelled outside the registry: code names ops through `interventions/ops.py`.

Every string literal in the package's code (client/, server/, interventions/ except ops.py itself,
recipes/) whose value is an op name of `ops.REGISTRY` is an op spelled by hand, and so is an f-string
that builds an op name from the registry's naming scheme (``f"Tensor.{name}"``). Code names a special
op by its constant (`ops.READ`), asks a property of its `OpSpec` (`spec.solo`), or asks the registry
(`ops.method_op(name)`).

Some op names are ordinary words that two other vocabularies share. A literal is not an op use only
where it plainly belongs to one of them, recognised by position, not by file (files move):

- job event kinds (``log``): the first argument or ``kind=`` of a call to ``Event``, or compared
  with a variable or attribute named ``kind``;
- command-line subcommands (``farscope keys add``): the first argument of ``add_parser``, or
  compared with an attribute named ``*_command``;
- Python attribute names (a proxy's ``.grad``): compared with the attribute-name parameter of a
  ``__getattr__`` / ``__setattr__`` / ``__delattr__`` it sits in;
- exported Python names (``farscope.save``, ``farscope.log``): an item of a module's ``__all__``.

The test runs once per file, so a failure names the file and each line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from farscope.interventions import ops

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("client", "server", "interventions", "recipes")
REGISTRY_FILE = Path("interventions/ops.py")
# Prefixes of the registry's op names for Tensor methods and torch functions.
NAME_PREFIXES = ("Tensor.", "torch.", "torch.nn.functional.")


def _files() -> list[Path]:
    files = [p.relative_to(ROOT) for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    return [p for p in files if p != REGISTRY_FILE]


def _name_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


_ATTRIBUTE_HOOKS = frozenset({"__getattr__", "__getattribute__", "__setattr__", "__delattr__"})


def _attribute_parameter(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str | None:
    """The attribute-name parameter of the `__getattr__`-like method `node` sits in, if any."""
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args
            return args[1].arg if node.name in _ATTRIBUTE_HOOKS and len(args) > 1 else None
    return None


def _other_vocabulary(literal: ast.Constant, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether `literal` is an event kind, a CLI subcommand or an attribute name by its position."""
    parent = parents.get(literal)
    if isinstance(parent, (ast.List, ast.Tuple)) and isinstance(parents.get(parent), ast.Assign):
        return any(_name_of(target) == "__all__" for target in parents[parent].targets)
    if isinstance(parent, ast.Call):
        callee = _name_of(parent.func)
        first = bool(parent.args) and parent.args[0] is literal
        return (callee == "Event" and first) or (callee == "add_parser" and first)
    if isinstance(parent, ast.keyword):
        return parent.arg == "kind"
    if isinstance(parent, ast.Compare) and len(parent.ops) == 1 and isinstance(parent.ops[0], (ast.Eq, ast.NotEq)):
        other = parent.left if parent.comparators[0] is literal else parent.comparators[0]
        name = _name_of(other) or ""
        return (name == "kind" or (isinstance(other, ast.Attribute) and name.endswith("_command"))
                or (isinstance(other, ast.Name) and name == _attribute_parameter(parent, parents)))
    return False


def _builds_an_op_name(node: ast.JoinedStr) -> bool:
    """``f"Tensor.{name}"``: a naming-scheme prefix followed by one value and nothing else."""
    parts = node.values
    return (len(parts) == 2 and isinstance(parts[0], ast.Constant) and parts[0].value in NAME_PREFIXES
            and isinstance(parts[1], ast.FormattedValue))


def op_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every op name spelled in `source`."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and _builds_an_op_name(node):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ops.REGISTRY:
            parent = parents.get(node)
            # Inside an f-string it is text; as a statement of its own, a docstring.
            if not (isinstance(parent, (ast.JoinedStr, ast.Expr)) or _other_vocabulary(node, parents)):
                found.append((node.lineno, repr(node.value)))
    return sorted(found)


@pytest.mark.parametrize("path", _files(), ids=str)
def test_no_op_name_is_spelled_outside_the_registry(path: Path) -> None:
    found = op_literals((ROOT / path).read_text(encoding="utf-8"))
    assert not found, f"{path} spells op names; use the ops.* constants and OpSpec properties:\n" + "\n".join(
        f"  {path}:{line}: {text}" for line, text in found)


# The check itself: it must see op uses in every form they take, and only those.


@pytest.mark.parametrize("source", [
    'if node.op == "read": pass',
    'if op in ("grad", "set_grad"): pass',
    'tracer.record("call_module", args)',
    'tracer.hook("write", path, "output", value)',
    'SOLO = frozenset({"backward", "stop", "log"})',
    'fn = table["Tensor.softmax"]',
    'check("torch.zeros", args)',
    'op = f"Tensor.{name}"',
    'point = "skip" if op == ops.SKIP else hook.point',
    'x = {"add": 1}',
    'def __getattr__(self, name):\n    return record("grad") if name == "x" else None',
    'def method(self, name):\n    if name == "grad": pass',
    'EXPORTS = ["save", "log"]',
    '__all__ = record("save")',
])
def test_the_check_finds_op_names(source: str) -> None:
    assert op_literals(source), source


@pytest.mark.parametrize("source", [
    'job.emit(Event("log", text=text))',
    'emit(Event(kind="log"))',
    'if event.kind == "log": pass',
    'if kind == "log": pass',
    'keys.add_parser("add", help="create a key")',
    'if args.keys_command == "add": pass',
    'raise TraceError(f"Tensor.{name} is not available on the server")',
    'if node.op == ops.READ: pass',
    'msg = "read the output"',
    'dtype = str(d).removeprefix("torch.")',
    '"""read"""',
    'def __setattr__(self, name, value):\n    if name == "grad": pass',
    '__all__ = ["save", "list", "log"]',
])
def test_the_check_leaves_other_strings_alone(source: str) -> None:
    assert op_literals(source) == [], source
