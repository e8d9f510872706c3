"""NNsight's surface on the client, without a server: saved values that are real tensors, builtin
exception types for remote failures, the module-level helpers, and clear errors for what is missing.
(The same features against a real server, compared with NNsight 0.8.1, are tests/nnsight_compat/.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import farscope
from farscope.client.envoy import build_tree
from farscope.client.proxy import Proxy, SavedTensor
from farscope.client.runner import as_builtin
from farscope.client.tracing import Barrier
from farscope.interventions.errors import RemoteError, TraceError
from farscope.interventions.graph import Graph


@dataclass(eq=False)
class _Tracer:
    """A trace that records into a bare graph (what a Proxy needs of one)."""

    model: Any = None
    is_open: bool = True
    session: Any = None
    graph: Graph = field(default_factory=Graph)
    saved: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.graph.begin("trace", {})

    def record(self, op: str, args: tuple = (), kwargs: dict | None = None) -> Proxy:
        return Proxy(self, self.graph.add(op, args, kwargs or {}))

    def save(self, proxy: Proxy) -> None:
        self.saved.append(proxy)


def _saved(value: Any) -> SavedTensor:
    tracer = _Tracer()
    saved = tracer.record("Tensor.clone").save()
    tracer.is_open = False
    saved.set_value(value)
    return saved


def test_a_saved_tensor_is_the_tensor_after_the_trace() -> None:
    value = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    saved = _saved(value)
    assert isinstance(saved, torch.Tensor) and saved.value is value
    assert saved.shape == (2, 3) and saved.dtype == torch.float32
    assert torch.equal(saved + 1, value + 1) and type(saved + 1) is torch.Tensor
    assert np.asarray(saved).sum() == 15.0 and saved.numpy().shape == (2, 3)
    assert saved.data_ptr() == value.data_ptr()  # the same storage: nothing copied
    assert repr(saved) == repr(value) and f"{saved[0, 1]:.1f}" == "1.0"
    token = _saved(torch.tensor(7))
    assert token.tolist() == 7 and int(token) == 7  # what tokenizer.decode(token) does with it


def test_a_saved_non_tensor_forwards_to_its_value() -> None:
    pair = _saved((torch.ones(2), {"k": 1}))
    assert len(pair) == 2 and torch.equal(pair[0], torch.ones(2)) and pair[1] == {"k": 1}
    number = _saved(41)
    assert number + 1 == 42 and int(number) == 41


def test_a_saved_tensor_records_while_its_trace_is_open() -> None:
    tracer = _Tracer()
    saved = tracer.record("Tensor.clone").save()
    assert isinstance(saved, torch.Tensor) and not saved.has_value
    doubled = saved * 2
    summed = torch.sum(saved)
    assert isinstance(doubled, Proxy) and isinstance(summed, Proxy)
    assert [n.op for n in tracer.graph.nodes][-2:] == ["mul", "torch.sum"]
    with pytest.raises(TraceError, match="no truth value"):
        bool(saved)
    tracer.is_open = False
    with pytest.raises(TraceError, match="has no value yet|was not saved|no value"):
        saved.sum()


def test_requires_grad_is_accepted_and_records_nothing() -> None:
    tracer = _Tracer()
    proxy = tracer.record("Tensor.clone")
    count = len(tracer.graph.nodes)
    assert proxy.requires_grad_(True) is proxy and len(tracer.graph.nodes) == count


@pytest.mark.parametrize("builtin", [IndexError, KeyError, ValueError, TypeError, RuntimeError,
                                     AttributeError, ZeroDivisionError])
def test_a_remote_failure_is_also_the_builtin_exception_it_names(builtin: type[Exception]) -> None:
    error = as_builtin(RemoteError(f"{builtin.__name__}: it broke", node="%3 = getitem(%2, 1000)", node_id=3))
    assert isinstance(error, RemoteError) and isinstance(error, builtin)
    assert error.node == "%3 = getitem(%2, 1000)" and str(error).startswith(f"{builtin.__name__}: it broke")
    with pytest.raises(builtin):
        raise error


def test_only_whitelisted_builtins_are_chosen() -> None:
    for message in ("SystemExit: no", "MemoryError: big", "os.system: x", "plain failure"):
        error = RemoteError(message)
        assert as_builtin(error) is error
    forward = as_builtin(RemoteError("the model's forward pass failed: IndexError: index out of range"))
    assert isinstance(forward, IndexError)
    other = TraceError("IndexError: recorded, not remote")
    assert as_builtin(other) is other


def test_the_facade_has_nnsights_module_level_helpers() -> None:
    for name in ("save", "list", "dict", "apply", "log"):
        assert callable(getattr(farscope, name)), name
    assert farscope.save(3) == 3  # outside a trace, a plain value comes back as it is
    with pytest.raises(TraceError, match="inside"):
        farscope.list()
    assert Barrier(2)() is None


def test_missing_nnsight_features_say_so_and_name_the_alternative() -> None:
    root = build_tree(object(), [("", "LlamaForCausalLM"), ("lm_head", "Linear")])
    with pytest.raises(TraceError, match=r"\.source.*not supported yet"):
        _ = root.lm_head.source
    with pytest.raises(AttributeError, match="no submodule 'nope'"):
        _ = root.nope


class _Runner:
    """Takes the request a trace hands over on exit, runs nothing."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def execute(self, request: Any) -> None:
        self.requests.append(request)


def _hooks(graph: Graph) -> list[tuple[str, str, int]]:
    """(op, module, call) of every hook node, in recording order."""
    return [(n.op, n.args[0].module, n.kwargs.get("call", 0)) for n in graph.nodes
            if n.op in ("read", "write")]


def test_the_with_form_of_tracer_iter_records_its_body_for_every_step() -> None:
    from farscope.client.tracing import Tracer

    runner = _Runner()
    with Tracer(object(), "hi", mode="generate", options={"max_new_tokens": 3}, runner=runner) as tracer:
        tokens = farscope.list()
        with tracer.iter[1:]:
            tracer.hook("write", "model.layers.0", "output", 0)
            tokens.append(tracer.hook("read", "lm_head", "output").argmax(dim=-1))
    graph = runner.requests[0].graph
    assert _hooks(graph) == [("write", "model.layers.0", 1), ("read", "lm_head", 1),
                             ("write", "model.layers.0", 2), ("read", "lm_head", 2)]
    assert len(tokens) == 2  # one appended item per step, each saved when the trace ended
    argmaxes = [n.id for n in graph.nodes if n.op == "Tensor.argmax"]
    assert [n.args[0].id for n in graph.nodes if n.op == "save"] == argmaxes
    with pytest.raises(TraceError, match="outside this generation"):
        with Tracer(object(), "hi", mode="generate", options={"max_new_tokens": 2}, runner=runner) as tracer:
            with tracer.iter[5]:
                pass


def test_edits_are_recorded_into_every_invoke_of_later_traces() -> None:
    from farscope.client.model import Edit
    from farscope.client.tracing import Tracer

    runner = _Runner()
    with Tracer(object(), "", runner=runner) as recorder:
        recorder.hook("write", "model.layers.1", "output", recorder.hook("read", "model.layers.0", "output") * 0)
    edit = Edit(list(recorder.graph.nodes))
    with Tracer(object(), None, runner=runner, edits=[edit]) as tracer:
        with tracer.invoke("a"):
            pass
        with tracer.invoke("b"):
            tracer.hook("read", "lm_head", "output").save()
    graph = runner.requests[-1].graph
    writes = [n for n in graph.nodes if n.op == "write"]
    assert [w.kwargs["invoke"] for w in writes] == [0, 1]
    for write in writes:  # each write takes the value computed from its own invoke's read
        product = graph.nodes[write.args[1].id]
        assert graph.nodes[product.args[0].id].kwargs["invoke"] == write.kwargs["invoke"]
