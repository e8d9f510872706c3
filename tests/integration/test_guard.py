"""Ops that allocate from sizes given as data are refused before they allocate too much."""

from __future__ import annotations

import pytest
import torch

import farscope
from farscope.interventions import ops
from farscope.interventions.errors import LimitError
from farscope.server.guard import check_allocation, check_python, check_result, python_size

LIMIT = 2**30


@pytest.mark.parametrize(("op", "args", "kwargs"), [
    ("torch.zeros", (10**12,), {}),
    ("torch.ones", ((10**6, 10**6),), {}),
    ("torch.randn", (2**20, 2**20), {}),
    ("torch.full", ((10**7, 10**4), 1.0), {}),
    ("torch.zeros", (), {"size": (2**31,)}),
    ("torch.full", (), {"size": (2**31,), "fill_value": 1.0}),
    ("torch.arange", (0, 1e13), {}),
    ("torch.linspace", (0, 1), {"steps": 10**12}),
    ("torch.randint", (0, 5, (2**40,)), {}),
    ("torch.eye", (10**6,), {}),
    ("Tensor.new_zeros", (torch.ones(1), (2**40,)), {}),
    ("Tensor.new_ones", (torch.ones(1),), {"size": (2**40,)}),
    ("Tensor.new_full", (torch.ones(1), (2**40,), 0.0), {}),
    ("Tensor.repeat", (torch.ones(10), 10**9), {}),
])
def test_oversized_allocations_are_refused(op, args, kwargs):
    with pytest.raises(LimitError, match=f"{op} would allocate .* bytes, over the per-tensor limit of {LIMIT} "
                                         r"bytes \(max_tensor_bytes\)"):
        check_allocation(ops.REGISTRY[op], args, kwargs, LIMIT)


@pytest.mark.parametrize(("op", "args", "kwargs"), [
    ("torch.zeros", (3, 4), {}),
    ("torch.full", ((2, 2), 1.0), {}),
    ("torch.arange", (10,), {}),
    ("Tensor.repeat", (torch.ones(10), 2, 3), {}),
    ("torch.zeros", (2**26,), {"dtype": torch.float16}),  # 128 MiB
])
def test_ordinary_allocations_pass(op, args, kwargs):
    check_allocation(ops.REGISTRY[op], args, kwargs, LIMIT)


def test_size_rules_give_the_element_count_torch_allocates():
    cases = [
        ("torch.zeros", (3, 4), {}), ("torch.ones", ((2, 5),), {}), ("torch.rand", (), {"size": [7]}),
        ("torch.randn", (torch.Size([2, 3]),), {}), ("torch.full", ((2, 3), 1.5), {}),
        ("torch.randint", (0, 5, (4, 2)), {}), ("torch.randint", (5,), {"size": (3,)}), ("torch.eye", (3,), {}),
        ("torch.eye", (3, 5), {}), ("torch.arange", (10,), {}), ("torch.arange", (1, 10, 3), {}),
        ("torch.arange", (0.0, 1.0), {"step": 0.25}), ("torch.linspace", (0, 1, 9), {}),
        ("torch.linspace", (0, 1), {"steps": 4}), ("Tensor.new_zeros", (torch.ones(1), 2, 3), {}),
        ("Tensor.new_ones", (torch.ones(1),), {"size": (6,)}), ("Tensor.new_full", (torch.ones(1), (2, 2), 3.0), {}),
        ("Tensor.repeat", (torch.ones(2, 3), 2, 2), {}), ("torch.zeros", (0, 5), {}),
    ]
    for op, args, kwargs in cases:
        spec = ops.REGISTRY[op]
        assert spec.size_rule is not None, op
        assert spec.size_rule(args, kwargs) == spec.fn(*args, **kwargs).numel(), (op, args, kwargs)


def test_a_huge_allocation_in_a_graph_fails_alone(tiny_remote):
    m = tiny_remote["llama"]
    with pytest.raises(farscope.LimitError, match="Tensor.new_zeros would allocate") as info:
        with m.trace("John gave a drink to Mary"):
            h = m.model.layers[0].output
            (h.sum() + h.new_zeros((10**12,))).save()
    assert "test_guard.py" in str(info.value)
    with m.trace("John gave a drink to Mary"):
        h = m.model.layers[0].output.save()
    assert h.shape[0] == 1


# -- outputs that follow their inputs: sized before they run -----------------------------------------

_X = torch.randn(4, 8)
_V = torch.randn(10**5)
_ROW = torch.randn(1, 8)


@pytest.mark.parametrize(("op", "args", "kwargs"), [
    ("torch.nn.functional.pad", (_X, (0, 10**9)), {}),
    ("torch.nn.functional.one_hot", (torch.tensor([1, 10**9]),), {}),  # classes from the data
    ("torch.nn.functional.one_hot", (torch.tensor([1, 3]), 10**9), {}),
    ("torch.multinomial", (_X.softmax(-1), 10**9), {"replacement": True}),
    ("Tensor.repeat_interleave", (_X, 10**9), {}),
    ("Tensor.repeat_interleave", (_X, torch.tensor([10**9, 1, 1, 1])), {"dim": 0}),
    ("torch.outer", (_V, _V), {}),
    ("torch.kron", (_V, _V), {}),
    ("torch.diag", (_V,), {}),
    ("torch.einsum", ("i,j->ij", _V, _V), {}),
    ("torch.matmul", (_V[:, None], _V[None]), {}),
    ("matmul", (_V[:, None], _V[None]), {}),
    ("torch.nn.functional.linear", (_V[:, None], _V[:, None]), {}),
    ("add", (_V[:, None], _V[None]), {}),  # broadcasting
    ("torch.cat", ([_V.expand(10**4, -1)] * 2,), {}),
    ("getitem", (torch.randn(2, 2048), [0] * 10**6), {}),  # advanced indexing repeats rows
    ("Tensor.clone", (_ROW.expand(10**9, 8),), {}),  # a copy of a huge view
    ("Tensor.reshape", (_ROW.expand(10**9, 8), -1), {}),  # reshape copies what it cannot view
])
def test_outputs_sized_by_their_inputs_are_refused_before_running(op, args, kwargs):
    with pytest.raises(LimitError, match=f"{op} would allocate .* bytes, over the per-tensor limit of {LIMIT} "
                                         r"bytes \(max_tensor_bytes\)"):
        check_allocation(ops.REGISTRY[op], args, kwargs, LIMIT)


@pytest.mark.parametrize(("op", "args", "kwargs"), [
    ("torch.nn.functional.pad", (_X, (1, 2, 3, 4)), {"value": 0.5}),
    ("torch.nn.functional.one_hot", (torch.tensor([1, 3]),), {}),
    ("torch.nn.functional.one_hot", (torch.tensor([1, 3]), 7), {}),
    ("Tensor.repeat_interleave", (_X, 3), {"dim": 1}),
    ("Tensor.repeat_interleave", (_X, torch.tensor([1, 0, 2, 3])), {"dim": 0}),
    ("torch.outer", (_V[:100], _V[:50]), {}),
    ("torch.kron", (_X, _X), {}),
    ("torch.diag", (_V[:10], 2), {}),
    ("torch.einsum", ("ij,kj->ik", _X, _X), {}),
    ("torch.matmul", (torch.randn(2, 1, 4, 8), torch.randn(3, 8, 5)), {}),
    ("torch.nn.functional.linear", (_X, torch.randn(6, 8)), {}),
    ("add", (_X[:, None], _X[None]), {}),
    ("torch.cat", ([_X, _X, _X],), {"dim": 1}),
    ("torch.stack", ([_X, _X],), {}),
    ("getitem", (_X, [0, 2, 2]), {}),
    ("getitem", (_X, (slice(None), -1)), {}),
    ("Tensor.sum", (_ROW.expand(10**9, 8),), {"dim": 0}),  # reduces a huge view: small output
    ("getitem", (_ROW.expand(10**9, 8), 5), {}),  # a view of a huge view
])
def test_outputs_sized_by_their_inputs_are_accepted_and_equal_torch(op, args, kwargs):
    # run under a limit equal to the output's bytes: the bound is exact, not merely generous
    spec = ops.REGISTRY[op]
    expected = spec.fn(*args, **kwargs)
    nbytes = max(expected.nbytes, 1)
    check_allocation(spec, args, kwargs, LIMIT)
    if expected.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in args
                                                     if isinstance(t, torch.Tensor)}:
        check_allocation(spec, args, kwargs, nbytes)
        with pytest.raises(LimitError, match=f"{op} would allocate {expected.nbytes} bytes"):
            check_allocation(spec, args, kwargs, nbytes - 1)


def test_a_view_of_any_logical_size_is_accepted_after_it_runs():
    huge = _ROW.expand(10**9, 8)  # 32 GB as seen, 32 bytes held
    check_result(ops.REGISTRY["Tensor.expand"], huge, (_ROW, 10**9, 8), {}, LIMIT)
    with pytest.raises(LimitError, match=r"Tensor.clone produced 32000000000 bytes"):
        check_result(ops.REGISTRY["Tensor.clone"], _FakeBig(), (huge,), {}, LIMIT)


class _FakeBig(torch.Tensor):
    """Stands for a 32 GB result without allocating it: a tensor whose nbytes says so."""

    @staticmethod
    def __new__(cls):
        return torch.Tensor._make_subclass(cls, torch.zeros(1))

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        return 32_000_000_000


def test_meta_inference_leaves_the_random_stream_alone():
    probs = _X.softmax(-1)
    torch.manual_seed(0)
    expected = torch.multinomial(probs, 5, replacement=True)
    torch.manual_seed(0)
    check_allocation(ops.REGISTRY["torch.multinomial"], (probs, 10**7), {"replacement": True}, LIMIT)  # on meta
    assert torch.equal(torch.multinomial(probs, 5, replacement=True), expected)


# -- plain Python values: bounded before they are made -----------------------------------------------

@pytest.mark.parametrize(("op", "args", "message"), [
    ("pow", (10, 10**7), r"pow would make an int of 33219281 bits, over the limit of 65536 bits"),
    ("ipow", (3, 10**6), r"ipow would make an int of 1584963 bits"),
    ("mul", (2**60000, 2**60000), r"mul would make an int of 120002 bits"),
    ("lshift", (1, 10**6), r"lshift would make an int of 1000001 bits"),
    ("mul", ("x", 5_000_000_000), r"mul would make a sequence of 5000000000 elements, over the limit of 1048576"),
    ("mul", (5_000_000_000, [0]), r"mul would make a sequence of 5000000000 elements"),
    ("imul", ((1, 2), 2**20), r"imul would make a sequence of 2097152 elements"),
    ("add", ([0] * 2**19, [1] * (2**19 + 1)), r"add would make a sequence of 1048577 elements"),
    ("mod", ("%0999999999d", 1), r"mod: string formatting with % \(its widths are data\) is not supported"),
    ("Tensor.tolist", (torch.zeros(2**20 + 1),), r"Tensor.tolist would make a sequence of 1048577 elements"),
    ("Tensor.split", (torch.zeros(2**17), 1), r"Tensor.split would make 131072 tensors, over the limit of 65536"),
    ("torch.chunk", (torch.zeros(2**17), 2**17), r"torch.chunk would make 131072 tensors"),
    ("Tensor.unbind", (torch.zeros(2**17, 1),), r"Tensor.unbind would make 131072 tensors"),
])
def test_python_values_over_their_bounds_are_refused_before_running(op, args, message):
    with pytest.raises(LimitError, match=message):
        check_python(ops.REGISTRY[op], args, {})


@pytest.mark.parametrize(("op", "args"), [
    ("pow", (2, 65535)),  # exactly MAX_INT_BITS bits
    ("pow", (-1, 10**18)), ("pow", (10, -10**9)), ("pow", (2.0, 10)),
    ("mul", ("ab", 2**19)),  # exactly MAX_SEQUENCE_LENGTH characters
    ("mul", (2**30000 - 1, 2**35535)),  # an upper bound: bits of a + bits of b
    ("lshift", (1, 65535)),
    ("add", ([0] * 2**19, [1] * 2**19)),
    ("mod", (17, 5)),
    ("Tensor.tolist", (torch.arange(2**20),)),
    ("Tensor.split", (torch.arange(2**16), 1)),
])
def test_python_values_at_their_bounds_are_made_and_equal_python(op, args):
    spec = ops.REGISTRY[op]
    check_python(spec, args, {})
    value = spec.fn(*args)
    if isinstance(value, int):
        assert value.bit_length() <= ops.MAX_INT_BITS
    if op == "pow":
        assert value == args[0] ** args[1]
    if isinstance(value, (str, list)):
        assert len(value) <= ops.MAX_SEQUENCE_LENGTH
    assert python_size(value, "it") <= ops.MAX_SEQUENCE_LENGTH


def test_nested_sequences_are_counted_whole():
    row = [0.5] * 2**19
    assert python_size([row, row], "it") == 2**20
    with pytest.raises(LimitError, match=r"it holds more than 1048576 elements \(nested sequences counted whole\)"):
        python_size([row, row, row], "it")
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(LimitError, match="holds itself"):
        python_size(cycle, "it")
    assert python_size(torch.zeros(3, 4).tolist(), "it") == 12
    assert python_size({"a": [1, 2], "b": ()}, "it") == 5
