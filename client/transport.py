"""The client's only contact with gRPC: calls, chunking, and mapping gRPC errors to farscope's.

Every `grpc.RpcError` becomes a `FarscopeError` subclass here and nowhere else (as httpx maps
httpcore's exceptions at one boundary), chained with `from`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from farscope.interventions import codec
from farscope.interventions.errors import (
    ERROR_CLASSES,
    STATUS_OF,
    AuthError,
    FarscopeError,
    LimitError,
    TransportError,
    UploadMissingError,
    ValidationError,
)
from farscope.interventions.graph import IR_VERSION, Graph, to_document
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc

from .._version import __version__

__all__ = ["Transport", "CHUNK_BYTES"]

CHUNK_BYTES = 1 << 20
_CLASS_OF_STATUS: dict[str, type[FarscopeError]] = {status: cls for cls, status in STATUS_OF.items()}
_CLASS_OF_STATUS.update({
    "UNAUTHENTICATED": AuthError,
    "PERMISSION_DENIED": AuthError,
    "RESOURCE_EXHAUSTED": LimitError,
    "UNAVAILABLE": TransportError,
    "DEADLINE_EXCEEDED": TransportError,
    "INVALID_ARGUMENT": ValidationError,
})


def _translate(error: grpc.RpcError) -> FarscopeError:
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    metadata = dict(error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else {}
    name = metadata.get("farscope-error")
    cls = ERROR_CLASSES.get(name) if name else None
    if cls is None:
        cls = _CLASS_OF_STATUS.get(code.name if code else "", FarscopeError)
        if cls is TransportError:
            details = f"cannot reach the farscope server ({code.name if code else '?'}): {details}"
    node = metadata.get("farscope-node")
    return cls(details, node_id=int(node) if node and node.isdigit() else None,
               job_id=metadata.get("farscope-job"))


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as e:
        raise _translate(e) from e


class Transport:
    """A channel to one farscope server."""

    def __init__(self, address: str, *, api_key: str | None = None, timeout: float | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 8 * CHUNK_BYTES),
            ("grpc.max_send_message_length", 8 * CHUNK_BYTES),
        ])
        self._stub = pb_grpc.FarscopeStub(self._channel)
        self.uploaded: set[str] = set()  # digests of large tensors this server has received
        self.last_request_bytes = 0

    def close(self) -> None:
        self._channel.close()

    def list_models(self) -> pb.ListModelsResponse:
        with _mapped():
            return self._stub.ListModels(pb.ListModelsRequest(), metadata=self._metadata, timeout=self.timeout)

    def describe(self, name: str) -> pb.ModelDescription:
        with _mapped():
            return self._stub.DescribeModel(pb.DescribeModelRequest(name=name), metadata=self._metadata,
                                            timeout=self.timeout)

    def tokenizer_files(self, name: str) -> dict[str, bytes]:
        files: dict[str, bytearray] = {}
        with _mapped():
            for chunk in self._stub.GetTokenizer(pb.DescribeModelRequest(name=name), metadata=self._metadata,
                                                 timeout=self.timeout):
                buffer = files.setdefault(chunk.name, bytearray(chunk.size))
                buffer[chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
        return {name: bytes(data) for name, data in files.items()}

    def execute(self, model: str, graph: Graph | bytes, *, ir_version: int = IR_VERSION,
                on_event: Callable[[pb.ExecuteEvent], None] | None = None,
                on_log: Callable[[str], None] | None = None) -> Any:
        """Send one graph (or an encoded document); return the saved values by node id.

        Large tensors this server already received travel by digest; if it has evicted one, the
        request is sent once more with everything inline.
        """
        if isinstance(graph, bytes):
            return self._execute(model, graph, ir_version, on_event, on_log)
        for attempt in range(2):
            sent: set[str] = set()
            document = codec.encode(to_document(graph), known=self.uploaded, sent=sent)
            try:
                results = self._execute(model, document, ir_version, on_event, on_log)
            except UploadMissingError:
                if attempt:
                    raise
                self.uploaded.clear()
                continue
            self.uploaded |= sent
            return results
        raise AssertionError("unreachable")

    def _execute(self, model: str, document: bytes, ir_version: int,
                 on_event: Callable[[pb.ExecuteEvent], None] | None,
                 on_log: Callable[[str], None] | None) -> Any:
        self.last_request_bytes = len(document)
        def requests() -> Iterator[pb.ExecuteRequest]:
            yield pb.ExecuteRequest(header=pb.RequestHeader(
                model=model, client_version=__version__, ir_version=ir_version, graph_bytes=len(document)))
            view = memoryview(document)
            for offset in range(0, len(document), CHUNK_BYTES):
                yield pb.ExecuteRequest(graph_chunk=view[offset:offset + CHUNK_BYTES].tobytes())

        blobs: list[bytearray] = []
        finished = False
        with _mapped():
            for event in self._stub.Execute(requests(), metadata=self._metadata, timeout=self.timeout):
                kind = event.WhichOneof("event")
                if kind == "result":
                    blobs = [bytearray(size) for size in event.result.blob_sizes]
                elif kind == "chunk":
                    chunk = event.chunk
                    blobs[chunk.blob][chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
                elif kind == "done":
                    finished = True
                elif kind == "log" and on_log is not None:
                    on_log(event.log.text)
                if on_event is not None:
                    on_event(event)
        if not finished or not blobs:
            raise TransportError("the server closed the result stream before the job finished")
        return codec.decode_results(bytes(blobs[0]), blobs[1:])
