"""The server-side scan: shapes and dtypes on meta tensors equal what a real forward pass gives."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from farscope.interventions import codec
from farscope.interventions.errors import LimitError
from farscope.interventions.graph import Segment
from farscope.server.inputs import build_batch
from farscope.server.replica import Replica
from farscope.server.scan import MODULES, ROWS, Scanner

INVOKES = ["The Eiffel Tower is in", ["When Mary and John went", "Hello"]]


def _shapes(value: Any) -> Any:
    """A value's tree with tensors as (shape, dtype), as a scan document describes them."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, codec.Record) and set(value) == {"shape", "dtype"} and value.type_name == "TensorMeta":
        return (tuple(value["shape"]), value["dtype"])
    if isinstance(value, tuple | list):
        return tuple(_shapes(v) for v in value)
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return value if value is None or isinstance(value, int | float | bool | str) else type(value).__name__


def _real_outputs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def keep(path: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            found.setdefault(path, _shapes(output))
        return hook
    handles = [module.register_forward_hook(keep(path)) for path, module in model.named_modules()]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found


@pytest.fixture(scope="module")
def tiny_replicas(tiny_spec: Any) -> dict[str, Replica]:
    from farscope.server.loading import load_model

    return {arch: Replica(load_model(tiny_spec(arch))) for arch in ("llama", "gpt2", "gpt_neox")}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("invokes", [INVOKES[:1], INVOKES], ids=["one", "padded"])
def test_scan_shapes_equal_a_real_forward_pass(arch: str, invokes: list[Any], tiny_replicas: dict[str, Replica],
                                               tiny_local: dict[str, torch.nn.Module], tiny_tokenizer: Any) -> None:
    replica = tiny_replicas[arch]
    document = codec.decode_results(Scanner(replica).scan(Segment("trace", list(invokes))), [])
    local = tiny_local[arch]
    batch = build_batch(local, tiny_tokenizer, list(invokes))
    real = _real_outputs(local, batch.inputs)
    scanned = {path: _shapes(points["output"]) for path, points in document[MODULES].items()
               if "output" in points and path in real}
    assert scanned == {path: real[path] for path in scanned}
    assert set(real) <= set(document[MODULES])  # every module a real pass calls is scanned
    assert document[ROWS] == [list(r) for r in batch.rows]
    probs = [p for p in document[MODULES] if p.endswith("attn_probs")]
    assert probs, "attention probabilities are scanned too"
    batch_size, length = batch.inputs["input_ids"].shape
    heads = local.config.num_attention_heads
    assert _shapes(document[MODULES][probs[0]]["output"])[0] == (batch_size, heads, length, length)


def test_scan_is_cached_by_input_shape_and_bounded(tiny_replicas: dict[str, Replica]) -> None:
    scanner = Scanner(tiny_replicas["llama"])
    first = scanner.scan(Segment("trace", [[5, 6, 7]]))
    assert scanner.cached(Segment("trace", [[9, 9, 9]]))
    assert scanner.scan(Segment("trace", [[9, 9, 9]])) is first
    assert not scanner.cached(Segment("trace", [[9, 9, 9, 9]]))
    too_long = [list(range(10, 10 + 200))]  # over the context length (128)
    with pytest.raises(LimitError):
        scanner.scan(Segment("trace", too_long))


def test_the_served_model_is_untouched(tiny_replicas: dict[str, Replica]) -> None:
    replica = tiny_replicas["gpt2"]
    Scanner(replica).scan(Segment("trace", ["Hello there"]))
    assert all(p.device.type != "meta" for p in replica.model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in replica.model.modules())


def test_the_scan_rpc_is_authenticated_rate_limited_and_checked(tiny_replicas: dict[str, Replica],
                                                                tmp_path: Any) -> None:
    import grpc

    import farscope
    from farscope.interventions.graph import INVOKES, IR_VERSION, NODES, VERSION
    from farscope.proto import farscope_pb2 as pb
    from farscope.proto import farscope_pb2_grpc as pb_grpc
    from farscope.server.auth import KeyStore
    from farscope.server.service import start_server

    keys = KeyStore(tmp_path / "keys.db")
    server = start_server({"tiny-llama": tiny_replicas["llama"]}, keys=keys)
    try:
        key = keys.add("carol", models=["tiny-llama"], rate_per_minute=3)
        address = f"127.0.0.1:{server.port}"
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.FarscopeStub(channel)

        def scan(invokes: Any, *, api_key: str | None = key, nodes: list | None = None,
                 version: int = IR_VERSION, model: str = "tiny-llama") -> Any:
            document = codec.encode({VERSION: version, INVOKES: invokes, NODES: nodes or []})
            metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
            return stub.Scan(pb.ScanRequest(model=model, ir_version=version, document=document), metadata=metadata)

        with pytest.raises(grpc.RpcError) as info:
            scan(["Hello"], api_key=None)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            scan(["Hello"], model="tiny-gpt2")
        assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
        with pytest.raises(grpc.RpcError) as info:  # a scan sends inputs only
            scan(["Hello"], nodes=[["save", (1,), {}, ""]])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            scan(["Hello"], version=IR_VERSION + 100)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION or "version" in info.value.details()
        document = codec.decode_results(scan([[3, 4, 5, 6, 7, 8, 9]]).document, [])
        assert document[MODULES]["model.embed_tokens"]["output"]["shape"] == (1, 7, 64)
        for _ in range(5):  # a scan the model has cached costs no rate
            scan([[3, 4, 5, 6, 7, 8, 9]])
        scan([[3, 4]])
        scan([[3, 4, 5]])
        with pytest.raises(grpc.RpcError) as info:  # a fourth new shape in a minute: over the rate of 3
            scan([[3, 4, 5, 6]])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The client's RemoteModel asks the same RPC when a shape is first read.
        model = farscope.RemoteModel("tiny-llama", address=address, api_key=keys.add("dave"))
        with model.trace([3, 4]):
            shape = model.model.embed_tokens.output.shape
            saved = model.model.embed_tokens.output.save()
        assert shape == saved.shape == (1, 2, 64)
        channel.close()
    finally:
        server.stop(grace=1)
