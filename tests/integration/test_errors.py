"""Every class of error over real gRPC: the right farscope exception, and the server keeps serving.

Each test ends with `still_serving()`: the gRPC health service says SERVING, no hook was left behind
on the server's model, and an ordinary request on the same server returns the same value as before.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import msgpack
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import farscope
from farscope.client.transport import Transport
from farscope.interventions import codec
from farscope.interventions.graph import IR_VERSION, Graph, HookPoint, Ref, to_document
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc
from farscope.server.service import SERVICE_NAME

PROMPT = "John gave a drink to Mary"
MODEL = "tiny-llama"


# -- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def address(tiny_server) -> str:
    return f"127.0.0.1:{tiny_server.port}"


@pytest.fixture(scope="module")
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.FarscopeStub:
    return pb_grpc.FarscopeStub(channel)


@pytest.fixture(scope="module")
def transport(address: str) -> Iterator[Transport]:
    t = Transport(address, timeout=60)
    yield t
    t.close()


@pytest.fixture
def llama(tiny_remote) -> farscope.RemoteModel:
    return tiny_remote["llama"]


# The first block's MLP in each tiny architecture (a tensor-valued output everywhere).
FIRST_MLP = {
    "llama": lambda m: m.model.layers[0].mlp,
    "gpt2": lambda m: m.transformer.h[0].mlp,
    "gpt_neox": lambda m: m.gpt_neox.layers[0].mlp,
}


def _read_layers(model: farscope.RemoteModel) -> tuple[torch.Tensor, torch.Tensor]:
    """An ordinary request: the first MLP's output and the logits."""
    with model.trace(PROMPT):
        h = FIRST_MLP[model.name.removeprefix("tiny-")](model).output.save()
        logits = model.output.logits.save()
    return h.value, logits.value


@pytest.fixture(scope="module")
def baseline(tiny_remote) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What a plain request returns before any error has happened."""
    return {arch: _read_layers(m) for arch, m in tiny_remote.items()}


@pytest.fixture
def still_serving(tiny_server, tiny_remote, channel, baseline) -> Callable[[], None]:
    def check() -> None:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, (service, status)
        for name, replica in tiny_server.engine.replicas.items():
            leftover = [path for path, module in replica.model.named_modules()
                        if module._forward_hooks or module._forward_pre_hooks]
            assert not leftover, f"{name}: hooks left on {leftover}"
        for arch, model in tiny_remote.items():
            h, logits = _read_layers(model)
            assert torch.equal(h, baseline[arch][0]) and torch.equal(logits, baseline[arch][1]), arch
    return check


def _document(*nodes: list[Any], invokes: list[Any] | None = None, version: Any = IR_VERSION) -> bytes:
    return codec.encode({"version": version, "invokes": [PROMPT] if invokes is None else invokes,
                         "nodes": list(nodes)})


def _raw_execute(stub: pb_grpc.FarscopeStub, messages: list[pb.ExecuteRequest]) -> grpc.RpcError:
    """Send `messages` as one Execute call; return the error it must end with."""
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.Execute(iter(messages), timeout=60):
            pass
    return info.value


def _header(size: int, *, model: str = MODEL, ir_version: int = IR_VERSION) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(header=pb.RequestHeader(model=model, client_version="test", ir_version=ir_version,
                                                     graph_bytes=size))


def _farscope_error_of(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("farscope-error")


def _line_of(marker: str) -> int:
    """The line of this file holding `marker` (built at run time so this call does not match itself)."""
    with open(__file__, encoding="utf-8") as f:
        lines = [i for i, text in enumerate(f, 1) if marker in text]
    assert len(lines) == 1, lines
    return lines[0]


# -- (a) unknown module path ------------------------------------------------------------------------------


def test_the_client_lists_children_for_an_unknown_module(llama, still_serving) -> None:
    with pytest.raises(AttributeError, match="has no submodule 'nope'") as info:
        llama.model.nope  # noqa: B018
    assert "embed_tokens" in str(info.value) and "layers" in str(info.value) and "norm" in str(info.value)
    with pytest.raises(AttributeError, match="the model .* has no submodule 'transformer'"):
        llama.transformer  # noqa: B018
    still_serving()


@pytest.mark.parametrize(
    "path",
    ["model.nope", "model.layers.7", "model.layers.0.__class__", "__globals__", "model..layers", "..",
     "m\u043edel.layers.0"],
)
def test_an_unknown_module_path_on_the_wire_is_a_validation_error(path: str, transport, still_serving) -> None:
    graph = Graph(invokes=[PROMPT])
    read = graph.add("read", (HookPoint(path, "output"),), {"invoke": 0}, "exp.py:1")
    graph.add("save", (Ref(read.id),), where="exp.py:1")
    with pytest.raises(farscope.ValidationError, match="the model has no module") as info:
        transport.execute(MODEL, codec.encode(to_document(graph)))
    assert repr(path) in str(info.value)
    assert info.value.node_id == 0
    still_serving()


def test_an_unknown_module_path_is_invalid_argument(stub, still_serving) -> None:
    document = _document(["read", (HookPoint("model.nope", "output"),), {"invoke": 0}, ""])
    error = _raw_execute(stub, [_header(len(document)), pb.ExecuteRequest(graph_chunk=document)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'model.nope'" in error.details() and "model has: embed_tokens, layers, norm" in error.details()
    metadata = dict(error.trailing_metadata())
    assert metadata["farscope-error"] == "ValidationError" and metadata["farscope-node"] == "0"
    still_serving()


# -- (b) shape mismatch while patching ----------------------------------------------------------------------


def test_a_shape_mismatch_points_at_the_users_line(llama, still_serving) -> None:
    marker = "# " + "<- the bad patch"
    with pytest.raises(farscope.RemoteError) as info:
        with llama.trace(PROMPT):
            llama.model.layers[0].output[:, -1] = torch.zeros(3)  # <- the bad patch
            llama.lm_head.output.save()
    text = str(info.value)
    assert f"{__file__}:{_line_of(marker)}" in text
    assert "llama.model.layers[0].output[:, -1] = torch.zeros(3)" in text
    assert "setitem" in info.value.node and "RuntimeError" in text
    assert info.value.job_id and info.value.job_id in text
    assert isinstance(info.value.__cause__, grpc.RpcError)
    still_serving()


def test_a_shape_mismatch_in_an_in_place_edit_points_at_the_users_line(tiny_remote, still_serving) -> None:
    gpt2 = tiny_remote["gpt2"]
    marker = "# " + "<- the bad steer"
    with pytest.raises(farscope.RemoteError) as info:
        with gpt2.trace(PROMPT):
            gpt2.transformer.h[1].mlp.output[:, -1] += torch.ones(5)  # <- the bad steer
    assert f"{__file__}:{_line_of(marker)}" in str(info.value)
    assert "gpt2.transformer.h[1].mlp.output[:, -1] += torch.ones(5)" in str(info.value)
    still_serving()


def test_a_replaced_output_of_the_wrong_shape_points_at_the_users_line(llama, still_serving) -> None:
    marker = "# " + "<- the bad replacement"
    with pytest.raises(farscope.RemoteError, match="shape mismatch") as info:
        with llama.trace(PROMPT):
            llama.model.layers[0].output = torch.zeros(3)  # <- the bad replacement
            llama.lm_head.output.save()
    assert "write(model.layers.0.output" in info.value.node
    assert f"{__file__}:{_line_of(marker)}" in str(info.value)
    assert "llama.model.layers[0].output = torch.zeros(3)" in str(info.value)
    still_serving()


# -- (c) ops outside the whitelist ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["eval", "exec", "__import__", "os.system", "builtins.open", "torch.load",
                                "Tensor.__reduce_ex__"])
def test_an_op_outside_the_whitelist_is_a_validation_error(op: str, transport, still_serving) -> None:
    document = _document(
        ["read", (HookPoint("model.layers.0", "output"),), {"invoke": 0}, "exp.py:1"],
        [op, ("import os; os.system('touch /tmp/farscope-pwned')",), {}, "exp.py:2"],
    )
    with pytest.raises(farscope.ValidationError, match="not in the whitelist") as info:
        transport.execute(MODEL, document)
    assert repr(op) in str(info.value) and info.value.node_id == 1
    still_serving()


@pytest.mark.parametrize("attribute", ["__class__", "__globals__", "__dict__"])
def test_getattr_of_a_dunder_is_a_validation_error(attribute: str, transport, still_serving) -> None:
    document = _document(
        ["read", (HookPoint("model.layers.0", "output"),), {"invoke": 0}, ""],
        ["getattr", (Ref(0), attribute), {}, ""],
        ["save", (Ref(1),), {}, ""],
    )
    with pytest.raises(farscope.ValidationError, match="is not readable remotely"):
        transport.execute(MODEL, document)
    still_serving()


@pytest.mark.parametrize(
    "call",
    [lambda h: torch.fft.fft(h), lambda h: torch.linalg.svd(h), lambda h: torch.det(h),
     lambda h: torch.nn.functional.dropout(h)],
    ids=["fft", "linalg.svd", "det", "dropout"],
)
def test_a_torch_function_outside_the_whitelist_is_a_trace_error_at_once(
        call: Callable[[Any], Any], llama, monkeypatch, still_serving) -> None:
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing may be sent after a TraceError")
    monkeypatch.setattr(llama._transport, "execute", never)
    reached = []
    with pytest.raises(farscope.TraceError, match="not in farscope's op whitelist"):
        with llama.trace(PROMPT):
            call(llama.model.layers[0].output)
            reached.append(True)
    assert not reached
    monkeypatch.undo()
    still_serving()


_READ = ["read", (HookPoint("model.layers.0", "output"),), {"invoke": 0}, ""]
_DEEP = b"\x91" * 1000 + b"\xc0"  # a list nested 1000 deep: repr() of it raises RecursionError


def _packed(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# Each of these once escaped the decoder or validator as a non-farscope exception (AttributeError,
# TypeError, RuntimeError, ValueError, RecursionError), which reached the client as an internal error.
@pytest.mark.parametrize(
    ("document", "error"),
    [
        (_document(_READ, ["Tensor.sum", (Ref(0),), {b"dim": 0}, ""]), farscope.ValidationError),
        (_document(_READ, ["getattr", (Ref(0), ["shape"]), {}, ""]), farscope.ValidationError),
        (_document(version=torch.ones(3)), farscope.VersionError),
        (_packed({"version": IR_VERSION, "invokes": [PROMPT], "nodes": [  # torch.Size([2**64 - 1]): 6 = tuple, 9 = Size
            ["Tensor.view", msgpack.ExtType(6, _packed([1, msgpack.ExtType(9, _packed([2**64 - 1]))])), {}, ""]]}),
         farscope.ValidationError),
        (b"\x83\xa7version" + _DEEP + b"\xa7invokes\x91\xa1x\xa5nodes\x90", farscope.VersionError),
        (b"\x83\xa7version" + bytes([IR_VERSION]) + b"\xa7invokes\x91\xa1x\xa5nodes\x91\x94" + _DEEP
         + b"\xc7\x01\x06\x90\x80\xa0",
         farscope.ValidationError),
        (_document(["add", (1, _nested(400)), {}, ""]), farscope.ValidationError),
    ],
    ids=["bytes keyword", "list attribute", "tensor version", "size over 64 bits", "deep version", "deep op",
         "deep argument"],
)
def test_hostile_documents_are_rejected_as_such(document: bytes, error: type, transport, stub,
                                                still_serving) -> None:
    with pytest.raises(error):
        transport.execute(MODEL, document)
    raw = _raw_execute(stub, [_header(len(document)), pb.ExecuteRequest(graph_chunk=document)])
    assert raw.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), raw.details()
    still_serving()


# -- (d) malformed bytes ----------------------------------------------------------------------------------


def test_random_bytes_as_graph_chunks_are_invalid_argument(stub, still_serving) -> None:
    rng = random.Random(99)
    for _ in range(12):
        data = rng.randbytes(rng.randrange(1, 3000))
        cut = rng.randrange(len(data) + 1)
        chunks = [pb.ExecuteRequest(graph_chunk=part) for part in (data[:cut], data[cut:]) if part]
        error = _raw_execute(stub, [_header(len(data)), *chunks])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert _farscope_error_of(error) == "ValidationError"
    still_serving()


def test_random_bytes_through_the_client_transport_are_a_validation_error(transport, still_serving) -> None:
    with pytest.raises(farscope.ValidationError, match="malformed request document"):
        transport.execute(MODEL, b"\xc1" + random.Random(5).randbytes(100))
    still_serving()


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (lambda doc: [pb.ExecuteRequest(graph_chunk=doc)], "must start with a RequestHeader"),
        (lambda doc: [], "must start with a RequestHeader"),
        (lambda doc: [_header(len(doc) + 1), pb.ExecuteRequest(graph_chunk=doc)], "announced"),
        (lambda doc: [_header(len(doc)), pb.ExecuteRequest(graph_chunk=doc[:5])], "announced"),
        (lambda doc: [_header(len(doc)), _header(len(doc)), pb.ExecuteRequest(graph_chunk=doc)],
         "may only send graph chunks"),
    ],
    ids=["no header", "empty call", "short", "truncated", "two headers"],
)
def test_a_malformed_call_is_invalid_argument(messages, match: str, stub, still_serving) -> None:
    document = _document(["read", (HookPoint("model.layers.0", "output"),), {"invoke": 0}, ""],
                         ["save", (Ref(0),), {}, ""])
    error = _raw_execute(stub, messages(document))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in error.details()
    still_serving()


# -- (e) unsupported IR version ----------------------------------------------------------------------------


def test_an_unsupported_header_version_is_failed_precondition(stub, still_serving) -> None:
    document = _document(["read", (HookPoint("model.layers.0", "output"),), {"invoke": 0}, ""])
    error = _raw_execute(stub, [_header(len(document), ir_version=999), pb.ExecuteRequest(graph_chunk=document)])
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _farscope_error_of(error) == "VersionError"
    assert f"accepts graph IR version(s) {IR_VERSION}" in error.details() and "sent version 999" in error.details()
    still_serving()


def test_an_unsupported_header_version_through_the_client_is_a_version_error(transport, still_serving) -> None:
    document = _document(["read", (HookPoint("model.layers.0", "output"),), {"invoke": 0}, ""])
    with pytest.raises(farscope.VersionError, match=f"accepts graph IR version\\(s\\) {IR_VERSION}"):
        transport.execute(MODEL, document, ir_version=999)
    still_serving()


def test_an_unsupported_document_version_is_a_version_error(stub, transport, still_serving) -> None:
    document = _document(["read", (HookPoint("model.layers.0", "output"),), {"invoke": 0}, ""], version=999)
    error = _raw_execute(stub, [_header(len(document)), pb.ExecuteRequest(graph_chunk=document)])
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(farscope.VersionError, match=f"999 is not supported; this server accepts version\\(s\\) "
                                                    f"{IR_VERSION}") as info:
        transport.execute(MODEL, document)
    assert isinstance(info.value, farscope.ValidationError)
    still_serving()


# -- more: unknown model, what cannot be traced, errors during the forward pass -------------------------------


def test_an_unknown_model_is_model_not_found(address, stub, transport, still_serving) -> None:
    with pytest.raises(farscope.ModelNotFoundError, match="no model named 'no-such-model'") as info:
        farscope.RemoteModel("no-such-model", address=address)
    assert "tiny-llama" in str(info.value)  # the message lists what is served
    with pytest.raises(farscope.ModelNotFoundError):
        transport.execute("no-such-model", _document())
    error = _raw_execute(stub, [_header(0, model="no-such-model")])
    assert error.code() == grpc.StatusCode.NOT_FOUND and _farscope_error_of(error) == "ModelNotFoundError"
    still_serving()


def test_bool_of_a_proxy_outside_a_plain_if_is_a_trace_error(llama, still_serving) -> None:
    # A plain `if proxy:` records a conditional block (client/lowering.py); any other truth test cannot.
    with pytest.raises(farscope.TraceError, match="no truth value"):
        with llama.trace(PROMPT):
            bool(llama.model.layers[0].output.sum() > 0)
    with pytest.raises(farscope.TraceError, match="no truth value"):
        with llama.trace(PROMPT):
            total = llama.model.layers[0].output.sum()
            _ = 1 if total > 0 else 0
    still_serving()


def test_the_value_of_an_unsaved_proxy_is_a_trace_error(llama, still_serving, baseline) -> None:
    with llama.trace(PROMPT):
        unsaved = llama.model.layers[0].output
        saved = llama.lm_head.output.save()
    assert torch.equal(saved.value, baseline["llama"][1])
    with pytest.raises(farscope.TraceError, match="was not saved"):
        unsaved.value  # noqa: B018
    still_serving()


def test_a_failing_node_fails_only_its_own_request(tiny_remote, address, baseline, still_serving) -> None:
    """Bad and good requests interleaved from several threads: each bad one alone fails."""
    def bad(arch: str) -> None:
        model = farscope.RemoteModel(f"tiny-{arch}", address=address)  # one per thread: tracing is per model
        try:
            with pytest.raises(farscope.RemoteError, match="view"):
                with model.trace(PROMPT):
                    FIRST_MLP[arch](model).output.view(7, 7, 7).save()
        finally:
            model.close()

    def good(arch: str) -> None:
        model = farscope.RemoteModel(f"tiny-{arch}", address=address)
        try:
            h, logits = _read_layers(model)
        finally:
            model.close()
        assert torch.equal(h, baseline[arch][0]) and torch.equal(logits, baseline[arch][1])

    work = [(bad if i % 2 else good, ("llama", "gpt2", "gpt_neox")[i % 3]) for i in range(12)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(fn, arch) for fn, arch in work]
        for future in futures:
            future.result(timeout=120)
    still_serving()


def test_an_error_mid_forward_then_the_next_request_succeeds(llama, still_serving) -> None:
    with pytest.raises(farscope.RemoteError, match="no field 'nope'"):
        with llama.trace(PROMPT):
            llama.output.nope.save()
    with pytest.raises(farscope.RemoteError):
        with llama.trace(PROMPT):
            h = llama.model.layers[1].output
            h[:, 10**6] = 0
    still_serving()
