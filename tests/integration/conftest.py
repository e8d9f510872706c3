"""Real servers on free loopback ports, real clients, and local copies of the same weights.

The server loads each model through its normal path (`load_model`); references are computed on a
second copy loaded from the same files, with plain PyTorch hooks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from torch import nn

import farscope
from farscope.server.config import DEFAULT_MODEL
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.service import Server, start_server

TINY_ARCHS = ("llama", "gpt2", "gpt_neox")


@pytest.fixture(scope="session")
def tiny_server(tiny_spec) -> Iterator[Server]:
    replicas = {f"tiny-{arch}": Replica(load_model(tiny_spec(arch, name=f"tiny-{arch}"))) for arch in TINY_ARCHS}
    server = start_server(replicas, host="127.0.0.1", port=0)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="session")
def tiny_remote(tiny_server: Server) -> Iterator[dict[str, farscope.RemoteModel]]:
    models = {arch: farscope.RemoteModel(f"tiny-{arch}", address=f"127.0.0.1:{tiny_server.port}")
              for arch in TINY_ARCHS}
    yield models
    for model in models.values():
        model.close()


@pytest.fixture(scope="session")
def tiny_local(tiny_spec) -> dict[str, nn.Module]:
    """A second copy of each tiny model, for plain-PyTorch references."""
    return {arch: load_model(tiny_spec(arch)).model for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_spec):
    return load_model(tiny_spec("llama")).tokenizer


@pytest.fixture(scope="session")
def smol_server(default_model) -> Iterator[Server]:
    server = start_server({DEFAULT_MODEL.name: Replica(default_model)}, host="127.0.0.1", port=0)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="session")
def smol(smol_server: Server) -> Iterator[farscope.RemoteModel]:
    model = farscope.RemoteModel(DEFAULT_MODEL.name, address=f"127.0.0.1:{smol_server.port}")
    yield model
    model.close()


@pytest.fixture(scope="session")
def smol_local(farscope_cache_dir):
    """A second copy of smollm2-135m and its tokenizer, loaded from the same converted cache."""
    loaded = load_model(DEFAULT_MODEL, cache_dir=farscope_cache_dir)
    return loaded.model, loaded.tokenizer
