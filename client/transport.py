"""The client's only contact with gRPC: calls, chunking, and mapping gRPC errors to farscope's.

Every `grpc.RpcError` becomes a `FarscopeError` subclass here and nowhere else (as httpx maps
httpcore's exceptions at one boundary), chained with `from`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from farscope.interventions import codec
from farscope.interventions.codec import BULK_CHUNK_BYTES, MAX_MESSAGE_BYTES
from farscope.interventions.errors import (
    ERROR_CLASSES,
    FarscopeError,
    TransportError,
    UploadMissingError,
    class_of_status,
)
from farscope.interventions.graph import IR_VERSION, Graph, to_document
from farscope.proto import chunks
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc

from .._version import __version__

__all__ = ["Transport"]



def _translate(error: grpc.RpcError) -> FarscopeError:
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    metadata = dict(error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else {}
    name = metadata.get("farscope-error")
    cls = ERROR_CLASSES.get(name) if name else None
    if cls is None:
        cls = class_of_status(code.name if code else "")
        if cls is TransportError:
            details = f"cannot reach the farscope server ({code.name if code else '?'}): {details}"
    node = metadata.get("farscope-node")
    error = cls(details, node_id=int(node) if node and node.isdigit() else None,
                job_id=metadata.get("farscope-job"))
    retry_after = metadata.get("retry-after")
    if retry_after:
        try:
            error.retry_after = float(retry_after)  # how long to wait before a rate limit lets you in
        except ValueError:
            pass
    return error


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as e:
        raise _translate(e) from e


class Transport:
    """A channel to one farscope server."""

    def __init__(self, address: str, *, api_key: str | None = None, timeout: float | None = None,
                 secure: bool = False, ca_path: str | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if secure or ca_path:
            roots = Path(ca_path).read_bytes() if ca_path else None  # None: the system's CAs
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.FarscopeStub(self._channel)
        # The calls that carry bulk data, with chunks written and read without protobuf's copies
        # (proto/chunks.py): the same methods and bytes on the wire as the stub's.
        self._execute = self._channel.stream_stream(
            "/farscope.v1.Farscope/Execute", request_serializer=chunks.serializer,
            response_deserializer=chunks.event_deserializer)
        self._submit = self._channel.stream_unary(
            "/farscope.v1.Farscope/Submit", request_serializer=chunks.serializer,
            response_deserializer=pb.Queued.FromString)
        self._fetch = self._channel.unary_stream(
            "/farscope.v1.Farscope/Fetch", request_serializer=pb.JobRequest.SerializeToString,
            response_deserializer=chunks.event_deserializer)
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
        """Send one graph (or an encoded document), wait, and return the saved values by node id."""
        def call(body: list[bytes | memoryview]) -> Any:
            events = self._execute(self._requests(model, body, ir_version), metadata=self._metadata,
                                   timeout=self.timeout)
            return self._results(_Progress(on_event, on_log).over(events))
        return self._with_uploads(graph, call)

    def submit(self, model: str, graph: Graph, *, ir_version: int = IR_VERSION) -> str:
        """Queue a graph; returns its job id at once."""
        def call(body: list[bytes | memoryview]) -> str:
            reply = self._submit(self._requests(model, body, ir_version), metadata=self._metadata,
                                 timeout=self.timeout)
            return reply.job_id
        return self._with_uploads(graph, call)

    def watch(self, job_id: str, *, on_event: Callable[[pb.ExecuteEvent], None] | None = None,
              on_log: Callable[[str], None] | None = None) -> None:
        """Follow a job's events until it finishes; raises its error if it failed."""
        with _mapped():
            events = self._stub.Watch(pb.JobRequest(job_id=job_id), metadata=self._metadata)
            for _ in _Progress(on_event, on_log).over(events):
                pass

    def fetch(self, job_id: str) -> Any:
        """A finished job's saved values by node id, from any connection until the job's TTL."""
        with _mapped():
            return self._results(self._fetch(pb.JobRequest(job_id=job_id), metadata=self._metadata,
                                             timeout=self.timeout))

    def cancel(self, job_id: str) -> str:
        with _mapped():
            return self._stub.Cancel(pb.JobRequest(job_id=job_id), metadata=self._metadata,
                                     timeout=self.timeout).state

    def scan(self, model: str, document: bytes, *, ir_version: int = IR_VERSION) -> Any:
        """The server's scan (module shapes and dtypes) of the inputs in `document`, decoded."""
        with _mapped():
            reply = self._stub.Scan(pb.ScanRequest(model=model, ir_version=ir_version, document=document),
                                    metadata=self._metadata, timeout=self.timeout)
        return codec.decode_results(reply.document, [])

    # -- plumbing ------------------------------------------------------------------------------

    def _with_uploads(self, graph: Graph | bytes, call: Callable[[list[bytes | memoryview]], Any]) -> Any:
        """Large tensors this server already received travel by digest; if it has evicted one, the
        request is sent once more with everything inline."""
        if isinstance(graph, bytes):
            self.last_request_bytes = len(graph)
            with _mapped():
                return call([graph])
        for attempt in range(2):
            sent: set[str] = set()
            body = codec.encode_request(to_document(graph), known=self.uploaded, sent=sent)
            self.last_request_bytes = sum(len(piece) for piece in body)
            try:
                with _mapped():
                    result = call(body)
            except UploadMissingError:
                if attempt:
                    raise
                self.uploaded.clear()
                continue
            self.uploaded |= sent
            return result
        raise AssertionError("unreachable")

    @staticmethod
    def _requests(model: str, body: list[bytes | memoryview], ir_version: int) -> Iterator[pb.ExecuteRequest | bytes]:
        """The header, then the body's pieces (the document, each large tensor's own memory) cut into
        chunks, each serialized straight from that memory (one copy, made as gRPC asks for it)."""
        yield pb.ExecuteRequest(header=pb.RequestHeader(
            model=model, client_version=__version__, ir_version=ir_version,
            graph_bytes=sum(len(piece) for piece in body)))
        for piece in body:
            view = memoryview(piece).cast("B")
            for offset in range(0, len(view), BULK_CHUNK_BYTES):
                yield chunks.graph_chunk(view[offset:offset + BULK_CHUNK_BYTES])

    @staticmethod
    def _results(events: Iterable[pb.ExecuteEvent | chunks.RawChunk]) -> Any:
        """Assemble the result stream: one buffer per blob, allocated from the header's sizes, each
        chunk copied once into place; the tensors are then built over those buffers (no copy)."""
        views: list[memoryview] = []
        finished = False
        for event in events:
            if isinstance(event, chunks.RawChunk):
                end = event.offset + len(event.data)
                if event.blob >= len(views) or end > len(views[event.blob]):
                    raise TransportError("the server sent a result chunk outside its announced blobs")
                views[event.blob][event.offset:end] = event.data
                continue
            kind = event.WhichOneof("event")
            if kind == "result":
                views = [_receive_buffer(size) for size in event.result.blob_sizes]
            elif kind == "chunk":  # a chunk protobuf read (one the raw reader did not recognize)
                chunk = event.chunk
                views[chunk.blob][chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
            elif kind == "done":
                finished = True
        if not finished or not views:
            raise TransportError("the server closed the result stream before the job finished")
        return codec.decode_results(bytes(views[0]), views[1:])


def _receive_buffer(size: int) -> memoryview:
    """A writable buffer of `size` bytes that is not zero-filled first (bytearray(size) would write
    every page once before the data does); tensors are built over it as it is (torch.frombuffer)."""
    return memoryview(torch.empty(size, dtype=torch.uint8).numpy()).cast("B")


class _Progress:
    """Passes events through, printing log lines and showing a progress bar for slow generations."""

    def __init__(self, on_event: Callable[[pb.ExecuteEvent], None] | None,
                 on_log: Callable[[str], None] | None, *, after: float = 1.0) -> None:
        self.on_event = on_event
        self.on_log = on_log
        self.after = after
        self.bar: Any = None
        self.started = time.monotonic()

    def over(self, events: Iterable[pb.ExecuteEvent]) -> Iterator[pb.ExecuteEvent]:
        try:
            for event in events:
                kind = event.WhichOneof("event")
                if kind == "log" and self.on_log is not None:
                    self.on_log(event.log.text)
                elif kind == "progress":
                    self._progress(event.progress)
                if self.on_event is not None:
                    self.on_event(event)
                yield event
        finally:
            if self.bar is not None:
                self.bar.close()

    def _progress(self, progress: pb.Progress) -> None:
        if self.bar is None:
            if (time.monotonic() - self.started < self.after or os.environ.get("FARSCOPE_PROGRESS") == "0"
                    or not (sys.stderr and sys.stderr.isatty())):  # a bar only for a person watching
                return
            from tqdm.auto import tqdm

            self.bar = tqdm(total=progress.total, desc=f"farscope job {progress.job_id[:8]}", unit="step",
                            leave=False)
        self.bar.n = progress.step
        self.bar.refresh()
