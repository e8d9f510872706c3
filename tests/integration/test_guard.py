"""Ops that allocate from sizes given as data are refused before they allocate too much."""

from __future__ import annotations

import pytest
import torch

import farscope
from farscope.interventions.errors import LimitError
from farscope.server.guard import check_allocation

LIMIT = 2**30


@pytest.mark.parametrize(("op", "args", "kwargs"), [
    ("torch.zeros", (10**12,), {}),
    ("torch.ones", ((10**6, 10**6),), {}),
    ("torch.randn", (2**20, 2**20), {}),
    ("torch.full", ((10**7, 10**4), 1.0), {}),
    ("torch.empty", (), {"size": (2**31,)}),
    ("torch.arange", (0, 1e13), {}),
    ("torch.linspace", (0, 1), {"steps": 10**12}),
    ("torch.randint", (0, 5, (2**40,)), {}),
    ("torch.eye", (10**6,), {}),
    ("Tensor.new_zeros", (torch.ones(1), (2**40,)), {}),
    ("Tensor.repeat", (torch.ones(10), 10**9), {}),
])
def test_oversized_allocations_are_refused(op, args, kwargs):
    with pytest.raises(LimitError, match="would allocate"):
        check_allocation(op, args, kwargs, LIMIT)


@pytest.mark.parametrize(("op", "args", "kwargs"), [
    ("torch.zeros", (3, 4), {}),
    ("torch.full", ((2, 2), 1.0), {}),
    ("torch.arange", (10,), {}),
    ("Tensor.repeat", (torch.ones(10), 2, 3), {}),
    ("torch.zeros", (2**26,), {"dtype": torch.float16}),  # 128 MiB
])
def test_ordinary_allocations_pass(op, args, kwargs):
    check_allocation(op, args, kwargs, LIMIT)


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
