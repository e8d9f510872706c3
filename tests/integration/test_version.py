"""The version handshake: a client speaking a graph IR the server cannot serve is told what to do."""

from __future__ import annotations

import grpc
import pytest

import farscope
from farscope.interventions import codec
from farscope.interventions.graph import IR_VERSION, Graph, HookPoint, Ref, to_document


def _document(version: int) -> bytes:
    graph = Graph(invokes=["John gave a drink to Mary"], version=version)
    read = graph.add("read", (HookPoint("model.layers.0", "output"),), {"invoke": 0})
    graph.add("save", (Ref(read.id),))
    return codec.encode(to_document(graph))


@pytest.mark.parametrize("version", [0, IR_VERSION - 1, IR_VERSION + 1])
def test_an_old_or_new_client_gets_failed_precondition_naming_versions(tiny_remote, version):
    transport = tiny_remote["llama"]._transport
    with pytest.raises(farscope.VersionError) as info:
        transport.execute("tiny-llama", _document(version), ir_version=version)
    error = info.value
    assert isinstance(error.__cause__, grpc.RpcError)
    assert error.__cause__.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"accepts graph IR version(s) {IR_VERSION}" in str(error)
    assert f"sent version {version}" in str(error)
    assert "farscope 0.1.0" in str(error)  # names the client's package version it received
    assert "Install a farscope client that matches this server" in str(error)


def test_the_document_version_is_checked_too(tiny_remote):
    transport = tiny_remote["llama"]._transport
    with pytest.raises(farscope.VersionError, match="graph IR version 7 is not supported"):
        transport.execute("tiny-llama", _document(7), ir_version=IR_VERSION)


def test_the_server_lists_the_versions_it_accepts(tiny_remote):
    listing = tiny_remote["llama"]._transport.list_models()
    assert list(listing.ir_versions) == [IR_VERSION]
    assert listing.server_version == farscope.__version__
