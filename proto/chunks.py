"""Bulk-data messages (graph chunks, result chunks) written and read by hand, byte for byte what
protobuf writes for `ExecuteRequest{graph_chunk}` and `ExecuteEvent{chunk}` (farscope.proto).

Why: protobuf's Python API only takes and gives `bytes` for a bytes field, so a chunk built through it
is copied out of the tensor (`bytes(view)`), again into the serialized message, and on the other side
once to parse and once more to read `.data`. Here a chunk is serialized with one copy (header + a
memoryview of the tensor's memory, joined) and read as a memoryview of the received message, so the
receiver copies it once, straight into its final buffer. Any other message goes through protobuf as
usual: the readers return None for what they do not recognize, and the serializers accept messages.
tests/proto/test_chunks.py checks these bytes against protobuf's own, both ways.
"""

from __future__ import annotations

from typing import Any

from . import farscope_pb2 as pb

__all__ = ["RawChunk", "chunk_event", "event_deserializer", "graph_chunk", "read_chunk_event", "read_graph_chunk",
           "request_deserializer", "serializer"]

_GRAPH_CHUNK_TAG = 0x12  # ExecuteRequest.graph_chunk: field 2, length-delimited
_EVENT_CHUNK_TAG = 0x22  # ExecuteEvent.chunk: field 4, length-delimited
_BLOB_TAG, _OFFSET_TAG, _DATA_TAG = 0x08, 0x10, 0x1A  # ResultChunk's fields 1, 2 (varints) and 3 (bytes)


class RawChunk:
    """A result chunk read without protobuf; `data` is a memoryview into the received message.

    It answers `WhichOneof("event")` and `.chunk` as an `ExecuteEvent` carrying a chunk does, so code
    that looks at events (progress callbacks) need not tell the two apart."""

    __slots__ = ("blob", "offset", "data", "_size")

    def __init__(self, blob: int, offset: int, data: memoryview, size: int) -> None:
        self.blob = blob
        self.offset = offset
        self.data = data
        self._size = size  # of the serialized message

    def ByteSize(self) -> int:  # noqa: N802 - protobuf's spelling
        return self._size

    def WhichOneof(self, group: str) -> str:  # noqa: N802 - protobuf's spelling
        return "chunk"

    @property
    def chunk(self) -> RawChunk:
        return self


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; IndexError past the end, ValueError if too long."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def graph_chunk(data: bytes | memoryview) -> bytes:
    """A serialized `ExecuteRequest{graph_chunk: data}` (one copy of `data`)."""
    return b"".join((bytes((_GRAPH_CHUNK_TAG,)), _varint(len(data)), data))


def chunk_event(blob: int, offset: int, data: bytes | memoryview) -> bytes:
    """A serialized `ExecuteEvent{chunk: ResultChunk{blob, offset, data}}` (one copy of `data`)."""
    head = bytearray()
    if blob:  # proto3 leaves zero-valued fields out; so do we, to be byte-identical
        head += bytes((_BLOB_TAG,)) + _varint(blob)
    if offset:
        head += bytes((_OFFSET_TAG,)) + _varint(offset)
    size = len(data)
    if size:
        head += bytes((_DATA_TAG,)) + _varint(size)
    return b"".join((bytes((_EVENT_CHUNK_TAG,)), _varint(len(head) + size), head, data))


def read_graph_chunk(message: bytes) -> memoryview | None:
    """The data of a serialized `ExecuteRequest{graph_chunk}`, as a view; None for anything else."""
    if not message or message[0] != _GRAPH_CHUNK_TAG:
        return None
    try:
        size, pos = _read_varint(message, 1)
    except (IndexError, ValueError):
        return None
    if pos + size != len(message):  # another field too (or a truncated one): leave it to protobuf
        return None
    return memoryview(message)[pos:]


def read_chunk_event(message: bytes) -> RawChunk | None:
    """A serialized `ExecuteEvent{chunk}` read as a RawChunk; None for anything else."""
    if not message or message[0] != _EVENT_CHUNK_TAG:
        return None
    try:
        size, pos = _read_varint(message, 1)
        if pos + size != len(message):
            return None
        blob = offset = 0
        data = memoryview(b"")
        while pos < len(message):
            tag = message[pos]
            if tag == _BLOB_TAG:
                blob, pos = _read_varint(message, pos + 1)
            elif tag == _OFFSET_TAG:
                offset, pos = _read_varint(message, pos + 1)
            elif tag == _DATA_TAG:
                length, pos = _read_varint(message, pos + 1)
                if pos + length > len(message):
                    return None
                data = memoryview(message)[pos:pos + length]
                pos += length
            else:  # a field this reader does not know: protobuf reads it
                return None
    except (IndexError, ValueError):
        return None
    return RawChunk(blob, offset, data, len(message))


def serializer(message: Any) -> bytes:
    """A response or request serializer that passes pre-serialized messages through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def event_deserializer(message: bytes) -> Any:
    """ExecuteEvent.FromString, with result chunks read without a copy."""
    return read_chunk_event(message) or pb.ExecuteEvent.FromString(message)


def request_deserializer(message: bytes) -> Any:
    """ExecuteRequest.FromString, with graph chunks read without a copy (as a memoryview)."""
    data = read_graph_chunk(message)
    return data if data is not None else pb.ExecuteRequest.FromString(message)
