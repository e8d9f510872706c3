"""Control flow on traced values: Python `if` over a proxy becomes a conditional block of the graph.

This is the one module of farscope that reads the user's source. Nothing here is sent to the server:
the server receives `if` / `else` / `end` nodes (see `farscope.interventions.graph`) and decides the
condition on its own values; it never receives Python.

Two spellings record the same nodes:

- explicit: ``with tracer.cond(x > 0): ...`` then, optionally, ``with tracer.else_(): ...`` right after
  (`Branches.open_if` / `open_else` / `close`);
- plain Python, as NNsight users write it: ``if x > 0: ...`` (with ``elif`` / ``else``). `bool()` of a
  proxy calls `truth`, which finds the `if` statement being decided (the innermost `if` whose test
  spans the caller's current line, from an AST of the caller's file), records ``if(%x)`` and returns
  True, so Python records the `if` body inside the block. The block closes when the next node is
  recorded from outside the body (the caller's frame has left the body's lines, or returned), or when
  the trace ends; then the `else` body, if any, is compiled from the same file (its own line numbers,
  so errors still point at the user's lines) and run once on the client, recording into the else block.

A `while` on a traced value is unrolled to a bound (`Branches.max_iterations`, 16 unless set through
``tracer.branches.max_iterations = n``): each test records ``if(%c)`` *inside* the previous
iteration's block and returns True, so Python records the body once per iteration, each copy running
on the server only while the condition still holds; the test after the last copy records
``if(%c) fail(...) end``, so a loop that would run past its bound fails the request, naming the bound,
instead of stopping silently. The server bounds the unrolling like any block: by its nesting depth
limit and its node limit. The loop suits edits done in place (``while h.norm() > t: h *= 0.5``): a name
the body binds refers, after the loop, to the last unrolled iteration's value, which exists on the
server only if every iteration ran (using it otherwise fails, naming the block not taken).

What cannot be decided while recording is refused with a `TraceError` that says what to write instead:
`break` / `return` / `else` of a traced `while`, `and` / `or` / `not` /
chained comparisons around a proxy (Python would consult only part of the test), `break` / `continue`
/ `return` inside a traced `if` body (Python would take them unconditionally), and an `else` body that
assigns names (it runs on a copy of the caller's variables, so the assignment would be lost).
"""

from __future__ import annotations

import ast
import inspect
import linecache
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

import farscope.interventions as _interventions
from farscope.interventions import ops
from farscope.interventions.errors import TraceError

__all__ = ["Branches", "truth", "find_statement", "check_body", "assigned_names"]

# Frames in farscope's client package are the proxy machinery; the first frame outside is the caller,
# which must be the user's code: an `if` inside torch or farscope itself is never lowered.
_CLIENT = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LIBRARIES = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch, _interventions))

# How many times a `while` on a traced value is unrolled, unless a trace sets its own bound.
MAX_ITERATIONS = 16
_NOT_AN_IF = ("a proxy has no truth value here: only a plain `if <traced value>:` statement (or "
              "`with tracer.cond(value):`) is recorded as a condition; its value exists only on the server. "
              "Use torch.where(cond, a, b), or save the value and decide after the trace")


@dataclass
class _Block:
    """An open conditional block: its opener's proxy, and for a plain `if` where its body lies."""

    opener: Any  # the Proxy of the `if` / `else` node
    is_if: bool
    frame: FrameType | None = None  # a plain `if`: the frame running it
    first: int = 0  # ... the line span of its body
    last: int = 0
    orelse: list[ast.stmt] = field(default_factory=list)  # ... and its `else` body
    names: dict[str, Any] = field(default_factory=dict)  # ... the caller's variables when it was decided
    loop: tuple[int, int] | None = None  # a `while` iteration: the statement's (line, column)
    iteration: int = 0  # ... its number, from 1


class Branches:
    """The conditional blocks open in one tracer, innermost last."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.open: list[_Block] = []
        self.last_closed_if: Any = None  # the `if` whose block closed last, for `tracer.else_()`
        self.max_iterations = MAX_ITERATIONS  # the unrolling bound of a `while` on a traced value
        self._closing = False

    # -- explicit blocks -----------------------------------------------------------------------

    def open_if(self, condition: Any) -> Any:
        self.before_record()
        block = _Block(self.tracer.record(ops.IF, (condition,)), is_if=True)
        self.open.append(block)
        return block

    def open_else(self) -> Any:
        self.before_record()
        return self._open_else()

    def _open_else(self) -> _Block:
        opener = self.last_closed_if
        if opener is None or self.tracer.graph.nodes[-1].op != ops.END:
            raise TraceError("tracer.else_() must come right after a `with tracer.cond(...)` block")
        self.last_closed_if = None
        self._closing = True  # the else belongs right after its if's end, inside the same enclosing blocks
        try:
            block = _Block(self.tracer.record(ops.ELSE, (opener,)), is_if=False)
        finally:
            self._closing = False
        self.open.append(block)
        return block

    def close(self, block: _Block) -> None:
        """Close `block` (and any plain `if` opened inside it, whose body has necessarily ended)."""
        while self.open and self.open[-1] is not block:
            self._close_top()
        if self.open:
            self._close_top()

    # -- plain `if` statements -----------------------------------------------------------------

    def open_plain_if(self, condition: Any, frame: FrameType, statement: ast.If) -> None:
        self.before_record()
        opener = self.tracer.record(ops.IF, (condition,))
        self.open.append(_Block(opener, True, frame, statement.body[0].lineno,
                                max(s.end_lineno or s.lineno for s in statement.body), list(statement.orelse),
                                dict(frame.f_locals) if statement.orelse else {}))

    def test_loop(self, condition: Any, frame: FrameType, statement: ast.While) -> bool:
        """One test of a `while` on a traced value: True to record one more iteration (see module doc)."""
        self.before_record()
        where = (statement.lineno, statement.col_offset)
        top = self.open[-1] if self.open else None
        iteration = top.iteration if top is not None and top.frame is frame and top.loop == where else 0
        last = max(s.end_lineno or s.lineno for s in statement.body)
        if iteration < self.max_iterations:
            self.open.append(_Block(self.tracer.record(ops.IF, (condition,)), True, frame, statement.lineno, last,
                                    loop=where, iteration=iteration + 1))
            return True
        overrun = self.open_if(condition)
        self.tracer.record(ops.FAIL, (
            f"the `while` at line {statement.lineno} would run more than {self.max_iterations} times, its bound "
            "while recording; raise it with `tracer.branches.max_iterations = n` (the server limits nesting "
            "depth), or save the value and decide after the trace",))
        self.close(overrun)
        for block in self.open:  # the loop is over: its iterations' blocks close at the next node
            if block.frame is frame and block.loop == where:
                block.first, block.last = 1, 0
        return False

    def before_record(self) -> None:
        """Close the plain `if` blocks whose body the caller has left (called before each node)."""
        if self._closing:
            return
        while self.open and self.open[-1].frame is not None and not _inside(self.open[-1]):
            self._close_top()

    def close_before_trace(self) -> None:
        """The next trace of a session starts: blocks opened between traces close here; one the caller
        is still inside would have to hold a whole trace, which a block cannot (blocks do not span traces)."""
        self.before_record()
        if self.open:
            raise TraceError("a trace cannot start inside an `if` / `while` on a traced value (or a tracer.cond "
                             "block): a conditional block does not span traces. Decide inside the trace instead")

    def close_all(self) -> None:
        """At the end of the trace body: every block still open ends here."""
        while self.open:
            self._close_top()

    def _close_top(self) -> None:
        block = self.open.pop()
        self._closing = True
        try:
            self.tracer.record(ops.END, (block.opener,))
        finally:
            self._closing = False
        self.last_closed_if = block.opener if block.is_if else None
        if block.orelse:
            self._run_else(block)

    def _run_else(self, block: _Block) -> None:
        assert block.frame is not None
        filename = block.frame.f_code.co_filename
        else_block = self._open_else()  # inside the enclosing blocks, still open
        depth = len(self.open)
        code = compile(ast.Module(body=block.orelse, type_ignores=[]), filename, "exec")
        try:
            exec(code, block.frame.f_globals, block.names)  # the user's own code, on the user's machine
        finally:
            while len(self.open) > depth:  # plain `if`s inside the else body end with it
                self._close_top()
            self.close(else_block)


def _inside(block: _Block) -> bool:
    frame = inspect.currentframe()
    while frame is not None:
        if frame is block.frame:
            return block.first <= frame.f_lineno <= block.last
        frame = frame.f_back
    return False


def truth(proxy: Any) -> bool:
    """`bool(proxy)` while recording: records the `if` being decided and returns True (see module doc)."""
    frame = _caller()
    statement = None
    if frame is not None and not frame.f_code.co_filename.startswith(_LIBRARIES):
        statement = find_statement(frame.f_code.co_filename, frame.f_lineno)
    branches = getattr(proxy.tracer, "branches", None)
    if not isinstance(statement, (ast.If, ast.While)) or not _plain_test(statement.test) or branches is None:
        raise TraceError(_NOT_AN_IF)
    check_body(statement)
    if isinstance(statement, ast.While):
        return branches.test_loop(proxy, frame, statement)
    branches.open_plain_if(proxy, frame, statement)
    return True


def _caller() -> FrameType | None:
    """The frame that asked for the truth value: the first outside farscope's client package."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_filename.startswith(_CLIENT):
        frame = frame.f_back
    return frame


def _plain_test(test: ast.expr) -> bool:
    """Whether Python decides the statement by one `bool()` of the test's whole value."""
    if isinstance(test, ast.BoolOp) or isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return False
    return not (isinstance(test, ast.Compare) and len(test.ops) > 1)


_TREES: dict[tuple[str, int], ast.Module | None] = {}


def find_statement(filename: str, line: int) -> ast.If | ast.While | None:
    """The innermost `if` / `while` (or `elif`) whose test spans `line` of `filename`, if any."""
    lines = linecache.getlines(filename)
    if not lines:
        return None
    source = "".join(lines)
    key = (filename, hash(source))
    if key not in _TREES:
        try:
            _TREES[key] = ast.parse(source, filename)
        except SyntaxError:
            _TREES[key] = None
    tree = _TREES[key]
    if tree is None:
        return None
    found = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.While)) and node.test.lineno <= line <= (node.test.end_lineno or line):
            if found is None or node.test.lineno >= found.test.lineno:
                found = node
    return found


def check_body(statement: ast.If | ast.While) -> None:
    """Refuse what a traced `if` or `while` cannot mean while recording (see the module doc)."""
    if isinstance(statement, ast.While):
        for node in _outside_nested_scopes(statement.body):
            if isinstance(node, (ast.Break, ast.Return)):
                raise TraceError(f"`{type(node).__name__.lower()}` inside a `while` on a traced value (line "
                                 f"{node.lineno}): Python would take it on the first iteration whatever the server "
                                 "finds; put the condition into the `while` test")
        if statement.orelse:
            raise TraceError(f"the `else` of a `while` on a traced value (line {statement.orelse[0].lineno}) "
                             "is not supported: write its body after the loop")
        return
    for node in _outside_nested_scopes(statement.body):
        if isinstance(node, (ast.Break, ast.Continue, ast.Return)):
            keyword = type(node).__name__.lower()
            raise TraceError(f"`{keyword}` inside an `if` on a traced value cannot be decided while recording "
                             f"(line {node.lineno}): Python would take it whatever the server finds. Use "
                             "tracer.stop() to end the forward pass, or save the value and decide after the trace")
    if statement.orelse:
        for node in _outside_nested_scopes(statement.orelse):
            if isinstance(node, (ast.Break, ast.Continue, ast.Return, ast.Yield, ast.YieldFrom)):
                raise TraceError(f"the `else` of an `if` on a traced value cannot hold `{type(node).__name__.lower()}`"
                                 f" (line {node.lineno})")
        names = assigned_names(statement.orelse)
        if names:
            raise TraceError(f"the `else` of an `if` on a traced value assigns {', '.join(sorted(names))} (line "
                             f"{statement.orelse[0].lineno}): that assignment cannot reach your variables. "
                             "Assign before the `if`, or write `with tracer.cond(c): ...` and "
                             "`with tracer.else_(): ...`")


def _outside_nested_scopes(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """The nodes of `body`, not descending into functions, classes or lambdas (their own scopes), nor
    into loops for break/continue (theirs)."""
    stack: list[tuple[ast.AST, bool]] = [(s, False) for s in body]
    while stack:
        node, in_loop = stack.pop()
        if isinstance(node, (ast.Break, ast.Continue)) and in_loop:
            continue
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp,
                             ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        loop = in_loop or isinstance(node, (ast.For, ast.While, ast.AsyncFor))
        stack.extend((child, loop) for child in ast.iter_child_nodes(node))


def assigned_names(body: list[ast.stmt]) -> set[str]:
    """Plain names that `body` binds in its own scope (assignments, loop targets, imports, `with as`)."""
    names: set[str] = set()
    for node in _outside_nested_scopes(body):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names
