"""A farscope server on SmolLM2 for the NNsight compatibility suite (the same weights NNsight's reference
run loaded: the converted GGUF cache, float32), and a client on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import farscope
from farscope.server.config import DEFAULT_MODEL
from farscope.server.replica import Replica
from farscope.server.service import Server, start_server


@pytest.fixture(scope="session")
def compat_server(default_model) -> Iterator[Server]:
    server = start_server({DEFAULT_MODEL.name: Replica(default_model)}, host="127.0.0.1", port=0)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="session")
def compat_model(compat_server: Server) -> Iterator[farscope.RemoteModel]:
    model = farscope.RemoteModel(DEFAULT_MODEL.name, address=f"127.0.0.1:{compat_server.port}")
    yield model
    model.close()
