"""validate(): the only way from decoded request bytes to a Graph; every rejection names its problem."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from farscope.interventions import codec, ops
from farscope.interventions.errors import FarscopeError, LimitError, ValidationError, VersionError
from farscope.interventions.graph import IR_VERSION, Graph, HookPoint, Ref, to_document
from farscope.interventions.validate import SUPPORTED_IR_VERSIONS, GraphLimits, validate

# The module tree of a small Llama-style model, as `named_modules()` lists it.
PATHS = frozenset({
    "", "model", "model.embed_tokens", "model.layers", "model.layers.0", "model.layers.0.self_attn",
    "model.layers.0.mlp", "model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp", "model.norm",
    "lm_head",
})
LAYER = HookPoint("model.layers.0", "output")


def _check(document: Any, **kwargs: Any) -> Graph:
    """Validate `document` as the server sees it: after a trip through the codec."""
    return validate(codec.decode(codec.encode(document)), module_paths=PATHS, **kwargs)


def _doc(*nodes: list[Any], invokes: list[Any] | None = None, version: Any = IR_VERSION) -> dict[str, Any]:
    return {"version": version, "invokes": ["The Eiffel Tower is in"] if invokes is None else invokes,
            "nodes": list(nodes)}


def _node(op: Any, *args: Any, where: str = "exp.py:7", **kwargs: Any) -> list[Any]:
    return [op, tuple(args), kwargs, where]


def _read(hook: HookPoint = LAYER, invoke: int = 0) -> list[Any]:
    return _node("read", hook, invoke=invoke, where="exp.py:3")


def _rejects(document: Any, match: str, *, node_id: int | None = None,
             where: str | None = None, error: type[FarscopeError] = ValidationError) -> FarscopeError:
    with pytest.raises(error, match=match) as info:
        _check(document)
    if node_id is not None:
        assert info.value.node_id == node_id
    if where is not None:
        assert info.value.where == where
    return info.value


# -- a good document ---------------------------------------------------------------------------------


def test_a_good_document_is_accepted_as_a_graph() -> None:
    graph = Graph(invokes=["The Eiffel Tower is in", [[5, 6, 7]]])
    h = graph.add("read", (LAYER,), {"invoke": 0}, "exp.py:3")
    s = graph.add("getattr", (Ref(h.id), "shape"), where="exp.py:4")
    scaled = graph.add("mul", (Ref(h.id), 2.0), where="exp.py:5")
    graph.add("setitem", (Ref(scaled.id), (slice(None), -1), torch.zeros(64)), where="exp.py:6")
    graph.add("write", (HookPoint("model.layers.1.mlp", "output"), Ref(scaled.id)), {"invoke": 1}, "exp.py:6")
    total = graph.add("Tensor.sum", (Ref(scaled.id),), {"dim": -1, "keepdim": True}, "exp.py:7")
    logits = graph.add("read", (HookPoint("", "output"),), {"invoke": 0}, "exp.py:8")
    field = graph.add("field", (Ref(logits.id), "logits"), where="exp.py:9")
    cat = graph.add("torch.cat", ([Ref(total.id), Ref(total.id)],), {"dim": 0}, "exp.py:10")
    inputs = graph.add("read", (HookPoint("lm_head", "inputs"),), {"invoke": 1}, "exp.py:11")
    for ref in (s, field, cat, inputs):
        graph.add("save", (Ref(ref.id),), where="exp.py:12")

    checked = _check(to_document(graph))
    assert isinstance(checked, Graph) and checked.version == IR_VERSION
    assert checked.invokes == graph.invokes
    assert [n.op for n in checked.nodes] == [n.op for n in graph.nodes]
    assert [n.id for n in checked.nodes] == list(range(len(graph.nodes)))
    assert [n.where for n in checked.nodes] == [n.where for n in graph.nodes]
    assert str(checked.nodes[1]) == "%1 = getattr(%0, 'shape')  # exp.py:4"


@pytest.mark.parametrize(
    "invokes",
    [["one"], ["a", "b"], [["a", "b"]], [[1, 2, 3]], [[[1, 2], [3, 4]]], [torch.tensor([1, 2])],
     [torch.tensor([[1, 2]], dtype=torch.int32)]],
    ids=repr,
)
def test_every_accepted_input_form(invokes: list[Any]) -> None:
    assert len(_check(_doc(invokes=invokes)).invokes) == len(invokes)


def test_an_empty_graph_is_accepted() -> None:
    assert _check(_doc()).nodes == []


# -- version ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [999, 0, -1, IR_VERSION + 1, "1", None, True, 1.0, [1]], ids=repr)
def test_unsupported_versions_raise_version_error_naming_the_accepted_ones(version: Any) -> None:
    error = _rejects(_doc(version=version), "not supported", error=VersionError)
    assert isinstance(error, ValidationError)
    assert repr(version) in error.message
    assert "accepts version(s) " + ", ".join(map(str, SUPPORTED_IR_VERSIONS)) in error.message


def test_a_tensor_as_version_is_a_version_error() -> None:
    with pytest.raises(VersionError):
        validate({"version": torch.ones(3), "invokes": ["x"], "nodes": []}, module_paths=PATHS)


def test_a_missing_version_is_a_version_error() -> None:
    with pytest.raises(VersionError):
        _check({"invokes": ["x"], "nodes": []})


# -- the document's shape ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ([1, ["x"], []], "must be a map"),
        ("graph", "must be a map"),
        (None, "must be a map"),
        ({"version": IR_VERSION, "invokes": ["x"], "nodes": [], "code": "import os"}, "unknown keys: code"),
        ({"version": IR_VERSION, "invokes": ["x"]}, "lists 'invokes' and 'nodes'"),
        ({"version": IR_VERSION, "invokes": "x", "nodes": []}, "lists 'invokes' and 'nodes'"),
        ({"version": IR_VERSION, "invokes": ["x"], "nodes": {"0": 1}}, "lists 'invokes' and 'nodes'"),
    ],
    ids=["list", "str", "none", "extra key", "no nodes", "invokes str", "nodes map"],
)
def test_a_document_of_the_wrong_shape_is_rejected(document: Any, match: str) -> None:
    _rejects(document, match)


@pytest.mark.parametrize(
    "raw",
    [["add", (1, 2), {}], ["add", (1, 2), {}, "", "extra"], "add", None, ("add", (1, 2), {}, "")],
    ids=["3 fields", "5 fields", "str", "none", "tuple"],
)
def test_a_node_of_the_wrong_shape_is_rejected(raw: Any) -> None:
    _rejects(_doc(_read(), raw), r"node 1 must be \[op, args, kwargs, where\]", node_id=1)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (["add", [1, 2], {}, ""], "args must be a tuple and kwargs a map"),
        (["add", (1, 2), [], ""], "args must be a tuple and kwargs a map"),
        (["add", (1, 2), {}, None], "'where' must be a short string"),
        (["add", (1, 2), {}, "x" * 1001], "'where' must be a short string"),
        (["add", (1, 2), {"_private": 1}, ""], "keyword '_private' is not a valid argument name"),
        (["add", (1, 2), {"not an identifier": 1}, ""], "is not a valid argument name"),
        (["add", (1, 2), {"__class__": 1}, ""], "is not a valid argument name"),
        (["add", (1, b"raw"), {}, ""], "argument of type bytes is not allowed"),
        (["add", (1, "x" * 100_001), {}, ""], "too long"),
    ],
    ids=["args list", "kwargs list", "where none", "where long", "private kw", "bad kw", "dunder kw", "bytes",
         "long str"],
)
def test_bad_node_fields_and_argument_types_are_rejected(raw: list[Any], match: str) -> None:
    _rejects(_doc(raw), match, node_id=0)


def test_a_bytes_keyword_name_is_rejected() -> None:
    # msgpack maps may carry bytes keys even with strict_map_key; the validator must not crash on them.
    document = codec.decode(codec.encode(_doc(["add", (1, 2), {b"dim": 1}, ""])))
    with pytest.raises(ValidationError, match="not a valid argument name"):
        validate(document, module_paths=PATHS)


def test_arguments_of_a_type_the_codec_cannot_produce_are_rejected() -> None:
    document = _doc(["add", (1, object()), {}, "exp.py:1"])  # only reachable by calling validate directly
    with pytest.raises(ValidationError, match="argument of type object is not allowed") as info:
        validate(document, module_paths=PATHS)
    assert info.value.node_id == 0 and info.value.where == "exp.py:1"


def test_deeply_nested_arguments_are_rejected_not_crashing() -> None:
    deep: Any = 1
    for _ in range(600):  # deeper than Python's default recursion limit allows naive formatting
        deep = [deep]
    document = {"version": IR_VERSION, "invokes": ["x"], "nodes": [["add", (1, deep), {}, ""]]}
    with pytest.raises(ValidationError, match="nest too deeply"):
        validate(document, module_paths=PATHS)


def _deep_list(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"version": _deep_list(5000), "invokes": ["x"], "nodes": []}, VersionError),
        ({"version": IR_VERSION, "invokes": ["x"], "nodes": [[_deep_list(5000), (), {}, ""]]}, ValidationError),
        ({"version": IR_VERSION, "invokes": ["x"], "nodes": [["read", (HookPoint("x" * 90_000, "output"),),
                                                      {"invoke": 0}, ""]]}, ValidationError),
        ({"version": IR_VERSION, "invokes": ["x"], "nodes": [["add", (1, 2), {"y" * 90_000 + "-": 1}, ""]]},
         ValidationError),
    ],
    ids=["deep version", "deep op", "long path", "long keyword"],
)
def test_hostile_values_are_quoted_briefly_in_messages(document: dict[str, Any], error: type) -> None:
    # repr() of a list nested thousands deep raises RecursionError; errors must quote values bounded.
    with pytest.raises(error) as info:
        validate(document, module_paths=PATHS)
    assert len(str(info.value)) < 1000


# -- ops ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op",
    ["eval", "exec", "__import__", "compile", "open", "globals", "breakpoint", "os.system", "builtins.eval",
     "subprocess.run", "pickle.loads", "torch.load", "torch.save", "torch.from_file", "torch.manual_seed",
     "Tensor.__reduce_ex__", "Tensor.__setstate__", "Tensor.storage", "Tensor.register_hook", "Tensor.numpy",
     "Tensor.data_ptr", "setattr", "delattr", "Tensor.", "torch.", "", " add", "ADD", "add\x00"],
)
def test_ops_outside_the_whitelist_are_rejected(op: str) -> None:
    assert op not in ops.REGISTRY
    error = _rejects(_doc(_read(), _node(op, Ref(0))), "not in the whitelist", node_id=1, where="exp.py:7")
    assert repr(op) in error.message


@pytest.mark.parametrize("op", [None, 5, ["add"], ("add",), b"add", True])
def test_an_op_that_is_not_a_string_is_rejected(op: Any) -> None:
    _rejects(_doc(_node(op, 1, 2)), "unknown op", node_id=0)


@pytest.mark.parametrize(
    "attribute", ["__class__", "__globals__", "__dict__", "__init__", "_base", "data", "storage", "numpy",
                  "device", "", "shape ", ["shape"], 3, None],
    ids=repr,
)
def test_getattr_of_an_attribute_outside_the_whitelist_is_rejected(attribute: Any) -> None:
    _rejects(_doc(_read(), _node("getattr", Ref(0), attribute)), "is not readable remotely", node_id=1,
             where="exp.py:7")


@pytest.mark.parametrize("name", ["__class__", "_cache", "not-a-name", "", 3, None])
def test_field_names_must_be_public_identifiers(name: Any) -> None:
    _rejects(_doc(_read(), _node("field", Ref(0), name)), "is not allowed", node_id=1)


@pytest.mark.parametrize(
    ("op", "n_args", "expected"),
    [
        ("add", 1, "2"),
        ("add", 3, "2"),
        ("neg", 2, "1"),
        ("setitem", 2, "3"),
        ("read", 0, "1"),
        ("read", 2, "1"),
        ("write", 1, "2"),
        ("save", 0, "1"),
        ("save", 2, "1"),
        ("getattr", 1, "2"),
        ("field", 3, "2"),
        ("Tensor.sum", 0, "at least 1"),
    ],
)
def test_wrong_arity_is_rejected(op: str, n_args: int, expected: str) -> None:
    args = [Ref(0)] * n_args
    _rejects(_doc(_read(), _node(op, *args)), f"op {op} takes {expected} positional arguments, got {n_args}",
             node_id=1, where="exp.py:7")


@pytest.mark.parametrize(
    ("node", "match"),
    [
        (_node("grad", Ref(0), retain_graph=True), "grad takes no keywords"),
        (_node("set_grad", Ref(0), 0.0, scale=2), "set_grad takes no keywords"),
        (_node("stop", now=True), "stop takes no keywords"),
        (_node("log", Ref(0), sep=","), "log takes no keywords"),
        (_node("backward", Ref(0), create_graph=True), "backward accepts only retain_graph="),
        (_node("read", LAYER, invoke=0, at=1), r"needs invoke=<0..0>"),
        (_node("write", LAYER, 0.0, invoke=0, optional=True), r"needs invoke=<0..0>"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_keywords_an_op_does_not_take_are_rejected(node: list[Any], match: str) -> None:
    _rejects(_doc(_read(), node), match, node_id=1, where=node[3])


def test_keywords_an_op_takes_are_accepted() -> None:
    graph = _check(_doc(_read(), _node("backward", Ref(0), retain_graph=True),
                        _node("read", LAYER, invoke=0, call=0, optional=True), _node("Tensor.sum", Ref(0), dim=-1),
                        _node("call_module", HookPoint("model.norm", "forward"), Ref(0), anything=1)))
    assert [n.op for n in graph.nodes] == ["read", "backward", "read", "Tensor.sum", "call_module"]


@pytest.mark.parametrize("op", ["grad", "backward"])
def test_gradient_ops_need_a_reference_and_a_trace(op: str) -> None:
    _rejects(_doc(_read(), _node(op, 1.0)), f"{op} needs a reference to a value as first argument", node_id=1)
    document = {**_doc(_read(), _node(op, Ref(0))), "mode": "generate", "options": {"max_new_tokens": 2}}
    _rejects(document, f"{op}: gradients are not supported under generate", node_id=1)


# -- references ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [Ref(1), Ref(2), Ref(10**9), [Ref(0), Ref(1)], {"k": Ref(1)}, slice(Ref(1), None), (Ref(0), (Ref(5),))],
    ids=repr,
)
def test_references_to_itself_or_a_later_node_are_rejected(arg: Any) -> None:
    _rejects(_doc(_read(), _node("add", Ref(0), arg), _read()), "which is not an earlier node", node_id=1,
             where="exp.py:7")


def test_references_in_keyword_arguments_are_checked_too() -> None:
    _rejects(_doc(_read(), _node("Tensor.sum", Ref(0), dim=Ref(1))), "not an earlier node", node_id=1)


def test_the_first_node_cannot_refer_to_anything() -> None:
    _rejects(_doc(_node("add", Ref(0), 1)), "refers to %0", node_id=0)


# -- hook points --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "model.nope",
        "nope",
        "model.layers.2",
        "model.layers.00",
        "model.layers.-1",
        "model.layers.0.",
        ".model",
        "model..layers",
        "..",
        ".",
        "model.layers.0.mlp.act_fn",
        "__class__",
        "__dict__",
        "model.__class__",
        "model.__globals__",
        "model.layers.0.__init__.__globals__",
        "model.layers.__len__",
        "Model",
        "model ",
        "m\u043edel",  # Cyrillic о
        "model.layers.\uff10",  # fullwidth digit zero
        "model\u200b",  # zero-width space
        "model.layers.0\x00",
        "model/layers/0",
        "model.layers[0]",
    ],
)
def test_hook_points_on_unknown_modules_are_rejected_naming_the_path(path: str) -> None:
    error = _rejects(_doc(_read(HookPoint(path, "output"))), "the model has no module", node_id=0,
                     where="exp.py:3")
    assert repr(path) in error.message


def test_an_unknown_child_lists_the_parents_children() -> None:
    error = _rejects(_doc(_read(HookPoint("model.nope", "output"))), "no module 'model.nope'")
    assert "model has: embed_tokens, layers, norm" in error.message


def test_the_root_module_is_a_valid_hook_point() -> None:
    assert _check(_doc(_read(HookPoint("", "output")))).nodes[0].args[0] == HookPoint("", "output")


@pytest.mark.parametrize("point", ["grad", "outputs", "Output", "output ", "__call__", "weight", "forward", ""])
def test_unknown_hook_points_are_rejected(point: str) -> None:
    error = _rejects(_doc(_read(HookPoint("model.layers.0", point))), "unknown hook point", node_id=0)
    assert "output, input, inputs" in error.message


@pytest.mark.parametrize(
    "node",
    [
        _node("add", LAYER, 1),
        _node("add", 1, LAYER),
        _node("save", LAYER),
        _node("add", [LAYER], 1),
        _node("add", 1, (1, {"k": LAYER})),
        _node("Tensor.sum", 1, dim=LAYER),
        _node("write", LAYER, LAYER, invoke=0),
        _node("read", LAYER, invoke=LAYER),
    ],
    ids=["add first", "add second", "save", "in list", "in dict", "kwarg", "write value", "read kwarg"],
)
def test_hook_points_outside_read_and_write_are_rejected(node: list[Any]) -> None:
    _rejects(_doc(node), "may only be the first argument of read/write", node_id=0)


def test_read_and_write_need_a_hook_point_first() -> None:
    _rejects(_doc(_node("read", "model.layers.0", invoke=0)), "needs a module hook point", node_id=0)
    _rejects(_doc(_node("write", 1, 2, invoke=0)), "needs a module hook point", node_id=0)


# -- invokes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"invoke": 1}, {"invoke": 2}, {"invoke": -1}, {"invoke": 10**18}, {"invoke": "0"}, {"invoke": 0.0},
     {}, {"invoke": 0, "extra": 1}],
    ids=repr,
)
def test_invoke_index_must_be_in_range(kwargs: dict[str, Any]) -> None:
    error = _rejects(_doc(["read", (LAYER,), kwargs, "exp.py:3"]), r"needs invoke=<0..0>", node_id=0,
                     where="exp.py:3")
    assert "%0 = read(model.layers.0.output" in error.message


def test_a_read_may_span_the_whole_batch_but_a_write_may_not() -> None:
    assert _check(_doc(["read", (LAYER,), {"invoke": None}, ""])).nodes[0].kwargs == {"invoke": None}
    _rejects(_doc(["write", (LAYER, 0), {"invoke": None}, ""]), r"needs invoke=<0..0>", node_id=0)


def test_invoke_index_range_follows_the_number_of_invokes() -> None:
    document = _doc(_read(invoke=2), invokes=["a", "b", "c"])
    assert _check(document).nodes[0].kwargs == {"invoke": 2}
    _rejects(_doc(_read(invoke=3), invokes=["a", "b", "c"]), r"needs invoke=<0..2>")


def test_a_write_checks_its_invoke_too() -> None:
    _rejects(_doc(_node("write", LAYER, 0.0, invoke=5)), r"needs invoke=<0..0>", node_id=0)


# -- inputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [1.5, None, 7, True, {"input_ids": [1, 2]}, [], [[]], [1.5], ["a", 1], [[1, 2], "a"], [[1, "a"]],
     torch.ones(3), torch.ones(1, 2, 3, dtype=torch.int64), torch.tensor(3), torch.tensor([1, 2], dtype=torch.int8),
     Ref(0), HookPoint("model", "output"), b"bytes", (1, 2)],
    ids=lambda v: type(v).__name__ + ":" + repr(v)[:20],
)
def test_bad_input_types_are_rejected(value: Any) -> None:
    _rejects(_doc(invokes=["fine", value]), "input of invoke 1")


def test_an_overlong_prompt_is_rejected() -> None:
    _rejects(_doc(invokes=["x" * 100_001]), "longer than 100000 characters")


# -- limits ---------------------------------------------------------------------------------------------


def test_too_many_nodes_is_a_limit_error() -> None:
    nodes = [_read()] + [_node("add", Ref(i), 1) for i in range(5)]
    assert len(_check(_doc(*nodes), limits=GraphLimits(max_nodes=6)).nodes) == 6
    with pytest.raises(LimitError, match="graph has 7 nodes; the limit \\(max_nodes\\) is 6"):
        _check(_doc(*nodes, _node("save", Ref(0))), limits=GraphLimits(max_nodes=6))


def test_the_default_node_limit_applies() -> None:
    limit = GraphLimits().max_nodes
    nodes = [_read()] + [_node("add", Ref(0), 1)] * limit
    with pytest.raises(LimitError, match=f"limit \\(max_nodes\\) is {limit}"):
        validate(_doc(*nodes), module_paths=PATHS)


def test_too_many_invokes_and_tokens_are_limit_errors() -> None:
    with pytest.raises(LimitError, match="3 invokes exceed the limit of 2"):
        _check(_doc(invokes=["a", "b", "c"]), limits=GraphLimits(max_invokes=2))
    with pytest.raises(LimitError, match="inputs hold 12 tokens; the limit is 10"):
        _check(_doc(invokes=[[1] * 6, torch.ones(2, 3, dtype=torch.int64)]), limits=GraphLimits(max_input_tokens=10))


def test_limit_errors_are_not_validation_errors() -> None:
    # They map to RESOURCE_EXHAUSTED, not INVALID_ARGUMENT: the request was fine, only too big.
    assert not issubclass(LimitError, ValidationError)


# -- hostile documents: ValidationError/LimitError and nothing else -------------------------------------


_POOL: list[Any] = [None, True, -1, 0, 1, 2**63 - 1, 1.5, float("nan"), "", "__class__", "shape", "invoke",
                    b"x", Ellipsis, torch.float32, torch.ones(2), torch.ones((), dtype=torch.bfloat16), Ref(0),
                    Ref(99), LAYER, HookPoint("..", "output"), HookPoint("model", "grad"), slice(1, 2),
                    torch.Size([1, 2]), (), [], {}, [[[[[]]]]], {"invoke": 0}, "eval", "read", "write"]


def _mutations(rng: random.Random, value: Any) -> Any:
    """`value` with random parts swapped for other wire values."""
    if rng.random() < 0.08:
        return rng.choice(_POOL)
    if isinstance(value, dict):
        return {(rng.choice(["invoke", "dim", "_x", "version", "nodes"]) if rng.random() < 0.05 else k):
                _mutations(rng, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_mutations(rng, v) for v in value]
        if items and rng.random() < 0.05:
            del items[rng.randrange(len(items))]
        if rng.random() < 0.05:
            items.insert(rng.randrange(len(items) + 1), rng.choice(_POOL))
        return type(value)(items)
    return value


def test_mutated_documents_only_ever_raise_farscope_errors() -> None:
    rng = random.Random(7)
    good = _doc(
        _read(),
        _node("getattr", Ref(0), "shape"),
        _node("setitem", Ref(0), (slice(None), -1), torch.zeros(4)),
        _node("write", HookPoint("model.layers.1", "output"), Ref(0), invoke=0),
        _node("Tensor.sum", Ref(0), dim=-1),
        _node("save", Ref(4)),
        invokes=["a", [[1, 2]]],
    )
    accepted = 0
    for _ in range(3000):
        mutated = _mutations(rng, good)
        try:
            data = codec.encode(mutated)
        except TypeError:
            continue
        try:
            validate(codec.decode(data), module_paths=PATHS, limits=GraphLimits(max_invokes=4))
        except (ValidationError, LimitError):
            continue
        except BaseException as e:  # the point: nothing else may escape
            pytest.fail(f"validate raised {type(e).__name__}: {e} for {mutated!r}")
        accepted += 1
    assert 0 < accepted < 3000


# -- conditional blocks (if / else / end) -------------------------------------------------------


def _blocks(*nodes: list[Any]) -> dict[str, Any]:
    return _doc(_read(), _node("Tensor.sum", Ref(0)), *nodes)


def test_well_nested_blocks_with_an_else_are_accepted() -> None:
    graph = _check(_blocks(_node("if", Ref(1)), _node("if", True), _node("save", Ref(0)), _node("end", Ref(3)),
                           _node("end", Ref(2)), _node("else", Ref(2)), _node("save", Ref(1)),
                           _node("end", Ref(7))))
    assert [n.op for n in graph.nodes[2:]] == ["if", "if", "save", "end", "end", "else", "save", "end"]


@pytest.mark.parametrize(("nodes", "match"), [
    ([_node("if", Ref(1))], "never closed"),
    ([_node("end", Ref(1))], "innermost open block"),
    ([_node("if", Ref(1)), _node("if", Ref(1)), _node("end", Ref(2))], "innermost open block"),
    ([_node("if", Ref(1)), _node("end", 2)], "innermost open block"),
    ([_node("else", Ref(1))], "right after the end of its if"),
    ([_node("if", Ref(1)), _node("save", Ref(0)), _node("end", Ref(2)), _node("save", Ref(0)),
      _node("else", Ref(2))], "right after the end of its if"),
    ([_node("if", Ref(1)), _node("end", Ref(2)), _node("else", Ref(2)), _node("end", Ref(4)),
      _node("else", Ref(2))], "right after the end of its if"),
    ([_node("if", Ref(1)), _node("end", Ref(2)), _node("else", Ref(2))], "never closed"),
    ([_node("if", Ref(1), x=1), _node("end", Ref(2))], "takes no keywords"),
    ([_node("if"), _node("end", Ref(2))], "takes 1 positional"),
])
def test_badly_nested_blocks_are_rejected(nodes: list[list[Any]], match: str) -> None:
    _rejects(_blocks(*nodes), match)


def test_a_block_cannot_span_two_traces() -> None:
    document = {"version": IR_VERSION, "traces": [
        {"invokes": ["a"], "nodes": [_read(), _node("if", True)]},
        {"invokes": ["a"], "nodes": [_node("end", Ref(1))]},
    ]}
    _rejects(document, "never closed")


def test_blocks_nested_past_the_limit_are_a_limit_error_naming_it() -> None:
    def nested(depth: int) -> dict[str, Any]:
        opens = [_node("if", True) for _ in range(depth)]
        return _blocks(*opens, *[_node("end", Ref(1 + depth - i)) for i in range(depth)])
    _check(nested(32))
    with pytest.raises(LimitError, match="max_block_depth"):
        _check(nested(33))
    _check(nested(3), limits=GraphLimits(max_block_depth=3))
    with pytest.raises(LimitError, match=r"max_block_depth\) is 3"):
        _check(nested(4), limits=GraphLimits(max_block_depth=3))


def test_only_the_current_ir_version_is_accepted() -> None:
    assert SUPPORTED_IR_VERSIONS == (IR_VERSION,) and IR_VERSION == 2
    with pytest.raises(VersionError, match="version 1 is not supported"):
        _check(_doc(_read(), version=1))
