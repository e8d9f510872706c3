"""client/lowering.py on its own: Python `if` over a traced value records a conditional block.

A small recorder stands in for a trace (no server, no model): `_Value` is a traced value whose `bool()`
is `lowering.truth`, as a proxy's is; `work(tag)` records one node tagged with its caller's line. The
recorded graphs must be what the validator accepts, with each node inside the block it belongs to.
"""

from __future__ import annotations

import ast
import textwrap
from typing import Any

import pytest

from farscope.client.lowering import Branches, assigned_names, check_body, find_statement, truth
from farscope.interventions import ops
from farscope.interventions.errors import TraceError
from farscope.interventions.graph import Graph, Ref, to_document
from farscope.interventions.validate import validate


class _Recorder:
    def __init__(self) -> None:
        self.graph = Graph(invokes=["x"])
        self.branches = Branches(self)

    def record(self, op: str, args: tuple = ()) -> _Value:
        self.branches.before_record()
        args = tuple(Ref(a.node.id) if isinstance(a, _Value) else a for a in args)
        return _Value(self, self.graph.add(op, args))

    def work(self, tag: int) -> _Value:
        return self.record("torch.zeros", (tag,))

    def finish(self) -> list[tuple[str, Any]]:
        """Close what is open (the trace ends), check the graph validates; (op, tag or target) per node."""
        self.branches.close_all()
        validate(to_document(self.graph), module_paths={""})
        return [(n.op, n.args[0] if n.args else None) for n in self.graph.nodes]


class _Value:
    __bool__ = truth  # exactly what a Proxy's bool() does while recording

    def __init__(self, tracer: _Recorder, node: Any) -> None:
        self.tracer = tracer
        self.node = node


def test_a_plain_if_records_its_body_inside_a_block_and_what_follows_outside() -> None:
    t = _Recorder()
    condition = t.work(0)
    if condition:
        t.work(1)
        t.work(2)
    t.work(3)
    assert t.finish() == [("torch.zeros", 0), (ops.IF, Ref(0)), ("torch.zeros", 1), ("torch.zeros", 2),
                          (ops.END, Ref(1)), ("torch.zeros", 3)]


def test_else_and_elif_record_else_blocks_and_run_each_body_once() -> None:
    t = _Recorder()
    seen: list[str] = []
    condition, other = t.work(0), t.work(1)
    if condition:
        seen.append("then")
        t.work(2)
    elif other:
        seen.append("elif")
        t.work(3)
    else:
        seen.append("else")
        t.work(4)
    t.work(5)
    assert seen == ["then", "elif", "else"]  # each branch recorded once, into its own block
    assert t.finish() == [
        ("torch.zeros", 0), ("torch.zeros", 1), (ops.IF, Ref(0)), ("torch.zeros", 2), (ops.END, Ref(2)),
        (ops.ELSE, Ref(2)), (ops.IF, Ref(1)), ("torch.zeros", 3), (ops.END, Ref(6)), (ops.ELSE, Ref(6)),
        ("torch.zeros", 4), (ops.END, Ref(9)), (ops.END, Ref(5)), ("torch.zeros", 5)]


def test_the_then_body_binds_names_as_python_does() -> None:
    t = _Recorder()
    value = t.work(0)
    result = None
    if value:
        result = t.work(1)
    assert result is not None and result.node.id == 2
    t.finish()


def test_nested_ifs_helpers_and_loops_each_get_their_own_blocks() -> None:
    t = _Recorder()

    def helper(x: _Value) -> None:  # a helper called in the body records inside the block
        t.work(10)
        if x:
            t.work(11)

    values = [t.work(i) for i in range(2)]
    for value in values:
        if value:
            helper(value)
    assert t.finish() == [
        ("torch.zeros", 0), ("torch.zeros", 1),
        (ops.IF, Ref(0)), ("torch.zeros", 10), (ops.IF, Ref(0)), ("torch.zeros", 11), (ops.END, Ref(4)),
        (ops.END, Ref(2)),
        (ops.IF, Ref(1)), ("torch.zeros", 10), (ops.IF, Ref(1)), ("torch.zeros", 11), (ops.END, Ref(10)),
        (ops.END, Ref(8))]


def test_a_block_left_open_at_the_end_of_the_body_is_closed_then() -> None:
    t = _Recorder()
    if t.work(0):
        t.work(1)
    assert t.finish()[-1] == (ops.END, Ref(1))


def test_explicit_blocks_record_the_same_nodes() -> None:
    t = _Recorder()
    block = t.branches.open_if(t.work(0))
    t.work(1)
    t.branches.close(block)
    otherwise = t.branches.open_else()
    t.work(2)
    t.branches.close(otherwise)
    assert t.finish() == [("torch.zeros", 0), (ops.IF, Ref(0)), ("torch.zeros", 1), (ops.END, Ref(1)),
                          (ops.ELSE, Ref(1)), ("torch.zeros", 2), (ops.END, Ref(4))]


def test_an_else_without_its_if_right_before_is_refused() -> None:
    t = _Recorder()
    with pytest.raises(TraceError, match="right after"):
        t.branches.open_else()
    block = t.branches.open_if(True)
    t.branches.close(block)
    t.work(0)
    with pytest.raises(TraceError, match="right after"):
        t.branches.open_else()


def test_what_cannot_be_decided_while_recording_is_refused() -> None:
    t = _Recorder()
    value = t.work(0)
    with pytest.raises(TraceError, match="`break` inside a `while`"):
        while value:
            break
    with pytest.raises(TraceError, match="no truth value"):
        if value and True:
            pass
    with pytest.raises(TraceError, match="no truth value"):
        if not value:
            pass
    with pytest.raises(TraceError, match="no truth value"):
        bool(value)
    with pytest.raises(TraceError, match="`continue`"):
        for _ in range(2):
            if value:
                continue
    with pytest.raises(TraceError, match="assigns other"):
        if value:
            pass
        else:
            other = 1  # noqa: F841 - the refused assignment is the point
    assert [n.op for n in t.graph.nodes] == ["torch.zeros"]  # nothing was recorded by a refused test


def _statement(source: str) -> ast.If:
    tree = ast.parse(textwrap.dedent(source))
    statement = tree.body[0]
    assert isinstance(statement, ast.If)
    return statement


def test_find_statement_finds_the_innermost_test_at_a_line(tmp_path) -> None:
    path = tmp_path / "user.py"
    path.write_text("if a:\n    pass\nelif (b\n      and c):\n    while d:\n        pass\n")
    assert find_statement(str(path), 1).lineno == 1
    assert find_statement(str(path), 4).lineno == 3  # an elif is an `if` in its parent's else
    assert isinstance(find_statement(str(path), 5), ast.While)
    assert find_statement(str(path), 2) is None
    assert find_statement(str(tmp_path / "missing.py"), 1) is None


def test_check_body_allows_what_belongs_to_inner_scopes() -> None:
    check_body(_statement("""
        if x:
            for i in range(3):
                break
            def f():
                return 1
    """))
    with pytest.raises(TraceError, match="`return`"):
        check_body(_statement("if x:\n    return 1\n"))
    with pytest.raises(TraceError, match="`break`"):
        check_body(_statement("if x:\n    pass\nelse:\n    break\n"))


def test_assigned_names_sees_every_binding_but_not_inner_scopes() -> None:
    body = ast.parse(textwrap.dedent("""
        a = 1
        b += 1
        for c in x: pass
        with y as d: pass
        import e.f
        def g(): h = 1
        [i for i in x]
        (j := 2)
        x[0] = 1
        x.attr = 1
    """)).body
    assert assigned_names(body) == {"a", "b", "c", "d", "e", "g", "j"}



def test_a_while_unrolls_into_nested_blocks_up_to_its_bound_then_fails_past_it() -> None:
    t = _Recorder()
    t.branches.max_iterations = 3
    value = t.work(0)
    runs = 0
    while value:
        runs += 1
        value = t.work(runs)
    t.work(9)
    recorded = t.finish()
    assert runs == 3  # the body is recorded once per iteration, up to the bound
    assert recorded == [
        ("torch.zeros", 0),
        (ops.IF, Ref(0)), ("torch.zeros", 1),
        (ops.IF, Ref(2)), ("torch.zeros", 2),
        (ops.IF, Ref(4)), ("torch.zeros", 3),
        (ops.IF, Ref(6)), (ops.FAIL, recorded[8][1]), (ops.END, Ref(7)),  # a fourth iteration fails the request
        (ops.END, Ref(5)), (ops.END, Ref(3)), (ops.END, Ref(1)),
        ("torch.zeros", 9)]
    assert "more than 3 times" in recorded[8][1]


def test_a_while_entered_again_starts_its_count_again() -> None:
    t = _Recorder()
    t.branches.max_iterations = 1
    for _ in range(2):
        value = t.work(0)
        while value:
            value = t.work(1)
    ops_recorded = [op for op, _ in t.finish()]
    assert ops_recorded.count(ops.IF) == 4 and ops_recorded.count(ops.FAIL) == 2
