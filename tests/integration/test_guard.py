"""Ops that allocate from sizes given as data are refused before they allocate too much."""

from __future__ import annotations

import pytest
import torch

import farscope
from farscope.interventions import ops
from farscope.interventions.errors import LimitError
from farscope.server.guard import check_allocation

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
