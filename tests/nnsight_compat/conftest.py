"""A client for the NNsight compatibility suite on the shared SmolLM2 server (the same weights NNsight's
reference run loaded: the converted GGUF cache, float32).

The suite gets a handle of its own: patterns such as `model.edit(inplace=True)` attach interventions to
the handle they run on, which must not leak into other tests' `smol`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import farscope
from farscope.server.config import DEFAULT_MODEL
from farscope.server.service import Server


@pytest.fixture(scope="session")
def compat_model(smol_server: Server) -> Iterator[farscope.RemoteModel]:
    model = farscope.RemoteModel(DEFAULT_MODEL.name, address=f"127.0.0.1:{smol_server.port}")
    yield model
    model.close()
