"""Co-batch isolation: a job's results in a shared forward pass are bit-identical to its solo run,
whatever the job it shares the pass with does (in-place edits of values without a batch dimension,
writes, attention probabilities, failures, randomness, ...).

The passes run on the test's own thread through `Replica.execute_many`, as the scheduler's worker
runs them, so what shares a pass is decided by the test, not by timing; a hook on the model records
every forward pass's rows, to prove the victims' results came from the shared pass (not from a rerun
alone). One torch thread while they run: see `one_thread` in test_scheduling.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farscope.interventions import codec, ops
from farscope.interventions.errors import LimitError
from farscope.interventions.graph import Graph, HookPoint, Ref
from farscope.server import cobatch
from farscope.server.loading import load_model
from farscope.server.replica import Replica

LENGTH = 6  # tokens in every row: the shared pass's batch stays shorter than this
VOCAB = 500
EAGER_POINT = "model.layers.1.self_attn.attn_probs"


@pytest.fixture(scope="module")
def replica(tiny_spec) -> Replica:
    """A tiny Llama of its own (the session servers' models are not touched)."""
    return Replica(load_model(tiny_spec("llama", name="tiny-llama")))


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Passes:
    """The rows (token ids) of every forward pass of the model while it is installed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows: list[torch.Tensor] = []
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.rows.append(kwargs["input_ids"].detach().clone())

    def close(self) -> None:
        self._handle.remove()

    def holding(self, ids: torch.Tensor) -> list[int]:
        """The passes that ran row `ids`."""
        return [i for i, rows in enumerate(self.rows) if any(torch.equal(r, ids) for r in rows)]


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(seed))


def _read(g: Graph, module: str, point: str, invoke: int = 0) -> Ref:
    return Ref(g.add(ops.READ, (HookPoint(module, point),), {"invoke": invoke}).id)


def _save(g: Graph, ref: Ref) -> None:
    g.add(ops.SAVE, (ref,))


def victim(seeds: tuple[int, ...], eager: bool) -> Graph:
    """A small fixed trace: per invoke, the rotary table, layer 0's output and the logits (and layer
    1's attention probabilities when `eager`, so that it may share a pass with eager jobs)."""
    g = Graph(invokes=[_ids(s) for s in seeds])
    for invoke in range(len(seeds)):
        rotary = _read(g, "model.rotary_emb", "output", invoke)
        _save(g, Ref(g.add("getitem", (rotary, 0)).id))
        _save(g, _read(g, "model.layers.0", "output", invoke))
        if eager:
            _save(g, _read(g, EAGER_POINT, "output", invoke))
        _save(g, _read(g, "lm_head", "output", invoke))
    return g


def _solo(replica: Replica, graph: Graph) -> Any:
    """`graph`'s outcome alone: its saved values, or the error it fails with."""
    try:
        return _outcome(replica.execute(graph))
    except Exception as e:  # noqa: BLE001 - compared with the shared outcome
        return e


def _outcome(replica_result: Any) -> Any:
    if isinstance(replica_result, Exception):
        return replica_result
    return codec.decode_results(replica_result.document, [bytearray(b) for b in replica_result.blobs])


def _same(a: Any, b: Any) -> bool:
    """Bit-identical values (torch.equal), the same nesting, the same model-output types; equal errors."""
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, codec.Record):
        return isinstance(b, codec.Record) and a.type_name == b.type_name and _same(dict(a), dict(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _keys(replica: Replica, *graphs: Graph) -> list[Any]:
    return [cobatch.batch_key(g, [LENGTH] * sum(1 for _ in g.segments[0].invokes), replica.eager_modules)
            for g in graphs]


# -- the adversary ---------------------------------------------------------------------------------

# Hook points and how to reach a tensor in their value: indices into tuples / dicts. The rotary
# table, position ids and a module's kwargs have no batch dimension; the rest are per-row.
POINTS: list[tuple[str, str, tuple[Any, ...]]] = [
    ("model.rotary_emb", "output", (0,)),
    ("model.rotary_emb", "output", (1,)),
    ("model.layers.0", "inputs", (1, "position_embeddings", 0)),
    ("model.layers.0", "inputs", (1, "position_ids")),
    ("model.layers.0", "inputs", (0, 0)),
    ("model.layers.0.self_attn", "inputs", (1, "position_embeddings", 1)),
    ("model.layers.0.self_attn", "input", ()),
    ("model.layers.0.self_attn", "output", (0,)),
    ("model.embed_tokens", "output", ()),
    ("model.layers.0", "output", ()),
    ("model.layers.1.mlp", "output", ()),
    (EAGER_POINT, "output", ()),
    ("model.norm", "input", ()),
    ("lm_head", "output", ()),
    ("", "output", ("logits",)),
]

# In-place edits of a tensor %t: (op, args after %t, kwargs). `out=` and `inplace=True` mutate too.
MUTATIONS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("Tensor.mul_", (3.0,), {}),
    ("Tensor.add_", (1.0,), {}),
    ("Tensor.zero_", (), {}),
    ("Tensor.fill_", (0.5,), {}),
    ("Tensor.neg_", (), {}),
    ("Tensor.clamp_", (-0.1, 0.1), {}),
    ("iadd", (2.0,), {}),
    ("imul", (-1.0,), {}),
    ("setitem", ((Ellipsis, 0), 7.0), {}),
    ("torch.mul", (3.0,), {"out": "self"}),
    ("torch.nn.functional.relu", (), {"inplace": True}),
]

# Ops that only compute from %t (reductions over its first dimension among them).
COMPUTATIONS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("Tensor.sum", (0,), {}),
    ("Tensor.mean", (), {}),
    ("mul", (2.0,), {}),
    ("Tensor.flip", (0,), {}),
    ("Tensor.softmax", (-1,), {}),
]

ACTIONS = ("mutate", "write", "compute", "call", "random", "kwargs", "save", "root")


@st.composite
def adversaries(draw: st.DrawFn) -> tuple[Graph, bool]:
    """A random co-tenant graph; returns it and whether it draws random numbers."""
    n_invokes = draw(st.integers(1, 2))
    g = Graph(invokes=[_ids(100 + draw(st.integers(0, 50)) + 100 * i) for i in range(n_invokes)])
    random = False
    for _ in range(draw(st.integers(1, 5))):
        action = draw(st.sampled_from(ACTIONS))
        module, point, path = draw(st.sampled_from(POINTS))
        invoke = draw(st.integers(0, n_invokes - 1))
        if action == "write":
            current = _read(g, module, point, invoke)
            if path:  # a tuple or kwargs value: write a value built from its first tensor
                current = Ref(g.add("getitem", (current, path[0])).id)
            new = draw(st.sampled_from([0.0, "double", "tensor"]))
            if new == "double":
                new = Ref(g.add("mul", (current, 2.0)).id)
            elif new == "tensor":
                new = torch.full((16,), 0.25)
            g.add(ops.WRITE, (HookPoint(module, point), new), {"invoke": invoke})
            continue
        value = _read(g, module, point, invoke)
        if action == "kwargs":  # replace an entry of a module's kwargs (a dict the whole pass shares)
            if point == "inputs":
                kwargs = Ref(g.add("getitem", (value, 1)).id)
                table = Ref(g.add("getitem", (kwargs, "position_embeddings")).id)
                cos, sin = (Ref(g.add("getitem", (table, i)).id) for i in (0, 1))
                g.add("setitem", (kwargs, "position_embeddings", (Ref(g.add("mul", (cos, 2.0)).id), sin)))
            continue
        if action == "root":
            _save(g, value)
            continue
        for key in path:
            value = Ref(g.add("getitem", (value, key)).id)
        if action == "mutate":
            op, args, kwargs = draw(st.sampled_from(MUTATIONS))
            kwargs = {k: (value if v == "self" else v) for k, v in kwargs.items()}
            g.add(op, (value, *args), kwargs)
            if draw(st.booleans()):
                _save(g, value)
        elif action == "compute":
            op, args, kwargs = draw(st.sampled_from(COMPUTATIONS))
            _save(g, Ref(g.add(op, (value, *args), kwargs).id))
        elif action == "call":  # a module run out of order on the value (fails unless 64 wide)
            _save(g, Ref(g.add(ops.CALL_MODULE, (HookPoint("model.layers.1.mlp", ops.CALL_POINT), value)).id))
        elif action == "random":
            random = True
            noise = Ref(g.add("torch.randn_like", (value,)).id)
            if draw(st.booleans()):
                g.add("Tensor.copy_", (value, noise))
            else:
                _save(g, Ref(g.add("add", (value, noise)).id))
        else:
            _save(g, value)
    if draw(st.booleans()):
        _save(g, _read(g, "lm_head", "output", n_invokes - 1))
    return g, random


# -- tests -----------------------------------------------------------------------------------------


def _run_with_victims(replica: Replica, adversary: Graph, eager: bool) -> tuple[list[Any], Passes]:
    """victim A, the adversary, victim B (two invokes) in one `execute_many`; each one's outcome."""
    graphs = [victim((1,), eager), adversary, victim((2, 3), eager)]
    passes = Passes(replica.model)
    try:
        outcomes = [_outcome(r) for r in replica.execute_many(graphs)]
    finally:
        passes.close()
    return outcomes, passes


_SOLO: dict[tuple[tuple[int, ...], bool], Any] = {}


def _solo_victim(replica: Replica, seeds: tuple[int, ...], eager: bool) -> Any:
    if (seeds, eager) not in _SOLO:
        _SOLO[seeds, eager] = _solo(replica, victim(seeds, eager))
    return _SOLO[seeds, eager]


def _assert_victims_isolated(replica: Replica, outcomes: list[Any], passes: Passes, eager: bool) -> None:
    for seeds, outcome in (((1,), outcomes[0]), ((2, 3), outcomes[2])):
        solo = _solo_victim(replica, seeds, eager)
        assert not isinstance(outcome, Exception), outcome
        assert _same(outcome, solo), f"victim {seeds}'s result in the shared pass differs from its solo run"
        # Its result came from the shared pass (the first), not from a rerun alone.
        assert all(passes.holding(_ids(s)) == [0] for s in seeds), passes.rows


@settings(max_examples=120, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=adversaries())
def test_victim_is_bit_identical_to_its_solo_run_whatever_the_cotenant_does(replica, one_thread, drawn):
    adversary, random = drawn
    eager = _keys(replica, adversary)[0][2] == "eager"
    keys = _keys(replica, victim((1,), eager), adversary, victim((2, 3), eager))
    assert keys[0] is not None and len(set(keys)) == 1, keys  # the scheduler would take them together
    adversary_solo = _solo(replica, adversary)

    outcomes, passes = _run_with_victims(replica, adversary, eager)

    n_adversary_rows = len(adversary.segments[0].invokes)
    assert passes.rows[0].shape[0] == 3 + n_adversary_rows, "the three graphs did not share one pass"
    _assert_victims_isolated(replica, outcomes, passes, eager)
    if not random:  # random draws come from the server's unseeded generator: never reproducible
        assert _same(outcomes[1], adversary_solo), (outcomes[1], adversary_solo)


def test_in_place_edit_of_the_rotary_table_stays_with_its_job(replica, one_thread, caplog):
    """The issue's case: `rotary_emb.output[0] *= 3` in a shared pass changed another user's logits."""
    caplog.set_level(logging.INFO, logger="farscope.server.replica")
    adversary = Graph(invokes=[_ids(50)])
    cos = Ref(adversary.add("getitem", (_read(adversary, "model.rotary_emb", "output"), 0)).id)
    adversary.add("Tensor.mul_", (cos, 3.0))
    _save(adversary, _read(adversary, "lm_head", "output"))
    solo = _solo(replica, adversary)

    outcomes, passes = _run_with_victims(replica, adversary, eager=False)

    _assert_victims_isolated(replica, outcomes, passes, eager=False)
    # The adversary's own edit reaches the rest of its pass, as alone: it ran again alone for that.
    assert _same(outcomes[1], solo)
    assert passes.holding(_ids(50)) == [0, 1]
    assert any("runs again alone" in r.getMessage() and "in place" in r.getMessage() for r in caplog.records)


def test_a_read_only_cotenant_of_non_per_row_values_keeps_its_shared_result(replica, one_thread):
    """Reading (not changing) the rotary table and a module's kwargs does not cost a rerun."""
    reader = Graph(invokes=[_ids(60)])
    _save(reader, _read(reader, "model.rotary_emb", "output"))
    _save(reader, _read(reader, "model.layers.0", "inputs"))
    _save(reader, _read(reader, "", "output"))  # the model output stays a model output
    solo = _solo(replica, reader)

    outcomes, passes = _run_with_victims(replica, reader, eager=False)

    _assert_victims_isolated(replica, outcomes, passes, eager=False)
    assert _same(outcomes[1], solo)
    assert passes.holding(_ids(60)) == [0]
    assert outcomes[1][5].type_name == "CausalLMOutputWithPast"  # node 5 saves it


def test_a_failing_cotenant_fails_alone_and_the_others_keep_the_shared_pass(replica, one_thread):
    adversary = Graph(invokes=[_ids(70)])
    adversary.add(ops.WRITE, (HookPoint("model.layers.0", "output"), torch.zeros(7)), {"invoke": 0})
    _save(adversary, _read(adversary, "lm_head", "output"))
    solo = _solo(replica, adversary)
    assert isinstance(solo, Exception)

    outcomes, passes = _run_with_victims(replica, adversary, eager=False)

    _assert_victims_isolated(replica, outcomes, passes, eager=False)
    assert _same(outcomes[1], solo)  # its solo error, node and line included
    assert passes.holding(_ids(70)) == [0, 1]


def test_a_failed_shared_pass_reruns_each_alone_with_its_own_deadline(replica, one_thread, caplog):
    """A shared pass that fails as a whole (here: over its wall time) costs the others nothing but
    time: each runs again alone, with a deadline of its own, and gets its solo result."""
    caplog.set_level(logging.WARNING, logger="farscope.server.replica")
    graphs = [victim((1,), False), victim((2, 3), False)]

    def stopper(indices: list[int]):
        def check() -> None:
            if len(indices) > 1:
                raise LimitError("the job ran longer than max_wall_seconds=0")
        return check
    outcomes = [_outcome(r) for r in replica.execute_many(graphs, stopper=stopper)]

    assert _same(outcomes[0], _solo_victim(replica, (1,), False))
    assert _same(outcomes[1], _solo_victim(replica, (2, 3), False))
    assert any("shared pass of 2 graphs failed" in r.getMessage() for r in caplog.records)


def test_attention_probabilities_readers_share_passes_only_with_each_other(replica):
    plain, eager = victim((1,), False), victim((1,), True)
    plain_key, eager_key = _keys(replica, plain, eager)
    assert plain_key is not None and eager_key is not None and plain_key != eager_key
    writer = Graph(invokes=[_ids(1)])
    probs = _read(writer, EAGER_POINT, "output")
    writer.add(ops.WRITE, (HookPoint(EAGER_POINT, "output"), Ref(writer.add("mul", (probs, 1.0)).id)),
               {"invoke": 0})
    assert _keys(replica, writer) == [eager_key]


def test_a_batch_as_long_as_the_sequence_is_split(replica, one_thread):
    """Values without a batch dimension are 1 or `LENGTH` long: a pass of `LENGTH` rows could not tell
    them from per-row values, so the last graph runs alone."""
    graphs = [victim((10 + i,), False) for i in range(LENGTH)]
    passes = Passes(replica.model)
    try:
        outcomes = [_outcome(r) for r in replica.execute_many(graphs)]
    finally:
        passes.close()
    assert [rows.shape[0] for rows in passes.rows] == [LENGTH - 1, 1]
    for i, outcome in enumerate(outcomes):
        assert _same(outcome, _solo_victim(replica, (10 + i,), False))


def test_an_edit_of_rows_another_job_replaced_stays_with_its_job(replica, one_thread):
    """Job A edits, at a later hook, the rows it read of layer 0's output (layer 1's residual, so the
    edit reaches its logits); job B replaced that output meanwhile. Alone, A's edit reaches the model;
    in the shared pass it would not: A runs again alone, B keeps its shared result."""
    a = Graph(invokes=[_ids(80)])
    h = _read(a, "model.layers.0", "output")
    attention = Ref(a.add("getitem", (_read(a, "model.layers.1.self_attn", "output"), 0)).id)
    a.add("Tensor.add_", (h, attention))
    _save(a, _read(a, "lm_head", "output"))
    b = Graph(invokes=[_ids(81)])
    doubled = Ref(b.add("mul", (_read(b, "model.layers.0", "output"), 2.0)).id)
    b.add(ops.WRITE, (HookPoint("model.layers.0", "output"), doubled), {"invoke": 0})
    _save(b, _read(b, "lm_head", "output"))
    solo_a, solo_b = _solo(replica, a), _solo(replica, b)

    passes = Passes(replica.model)
    try:
        outcomes = [_outcome(r) for r in replica.execute_many([a, b])]
    finally:
        passes.close()

    assert _same(outcomes[0], solo_a) and _same(outcomes[1], solo_b)
    assert passes.holding(_ids(80)) == [0, 1] and passes.holding(_ids(81)) == [0]


def test_an_eager_cotenant_would_change_a_plain_job(replica, one_thread):
    """Why eager jobs share passes only with each other: forced into one pass (the scheduler never
    does this, see the test above), a job reading attention probabilities changes a plain job's
    logits, since the whole pass then computes eager attention."""
    eager_reader = Graph(invokes=[_ids(90)])
    _save(eager_reader, _read(eager_reader, EAGER_POINT, "output"))
    _save(eager_reader, _read(eager_reader, "lm_head", "output"))
    outcome = _outcome(replica.execute_many([victim((1,), False), eager_reader])[0])
    assert not _same(outcome, _solo_victim(replica, (1,), False))


def test_a_change_to_a_modules_kwargs_stays_with_its_job(replica, one_thread):
    """Replacing an entry of a module's kwargs (a dict the whole pass shares) reaches the module alone;
    in a shared pass the job changes its own copy, so it runs again alone."""
    adversary = Graph(invokes=[_ids(95)])
    kwargs = Ref(adversary.add("getitem", (_read(adversary, "model.layers.0", "inputs"), 1)).id)
    table = Ref(adversary.add("getitem", (kwargs, "position_embeddings")).id)
    cos, sin = (Ref(adversary.add("getitem", (table, i)).id) for i in (0, 1))
    adversary.add("setitem", (kwargs, "position_embeddings", (Ref(adversary.add("mul", (cos, 2.0)).id), sin)))
    _save(adversary, _read(adversary, "lm_head", "output"))
    solo = _solo(replica, adversary)

    outcomes, passes = _run_with_victims(replica, adversary, eager=False)

    _assert_victims_isolated(replica, outcomes, passes, eager=False)
    assert _same(outcomes[1], solo)
    assert passes.holding(_ids(95)) == [0, 1]


def test_through_the_scheduler_and_the_client(tiny_spec, tmp_path, caplog, one_thread):
    """End to end (client, gRPC, scheduler, `run_many`): the issue's two users, queued together."""
    from test_scheduling import _cobatch_records, _concurrently, _serving  # tests/load, like this file

    caplog.set_level(logging.INFO, logger="farscope.server")

    def honest(model: Any) -> dict[str, torch.Tensor]:
        with model.trace(_ids(1).view(1, -1)):
            hidden = model.model.layers[0].output.save()
            logits = model.lm_head.output.save()
        return {"hidden": hidden.value, "logits": logits.value}

    def hostile(model: Any) -> dict[str, torch.Tensor]:
        with model.trace(_ids(2).view(1, -1)):
            model.model.rotary_emb.output[0].mul_(3.0)
            logits = model.lm_head.output.save()
        return {"logits": logits.value}

    with _serving(tiny_spec, tmp_path, cobatch=True) as setup:
        with setup.model("alice") as alice, setup.model("bob") as bob:
            solo = {"alice": honest(alice), "bob": hostile(bob)}
        outcomes = _concurrently(setup, {"alice": honest, "bob": hostile})
    assert _cobatch_records(caplog) == [2]  # they shared a pass
    for user in ("alice", "bob"):
        assert not isinstance(outcomes[user], Exception), outcomes[user]
        assert outcomes[user].keys() == solo[user].keys()
        assert all(torch.equal(outcomes[user][k], solo[user][k]) for k in solo[user]), user
    assert sum("runs again alone" in r.getMessage() for r in caplog.records) == 1  # bob's job only
