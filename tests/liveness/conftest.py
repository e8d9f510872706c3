"""The co-tenancy fixture (cotenancy.py): one keyed server for this folder, under one torch thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from cotenancy import CoTenancy, serve


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cotenancy(tiny_spec: Callable[..., object], tmp_path_factory: pytest.TempPathFactory,
              one_torch_thread: None) -> Iterator[CoTenancy]:
    yield from serve(tiny_spec, tmp_path_factory.mktemp("liveness-keys"))
