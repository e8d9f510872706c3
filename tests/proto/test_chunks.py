"""Hand-written chunk messages (proto/chunks.py) are byte for byte what protobuf writes and reads."""

from __future__ import annotations

import pytest

from farscope.proto import chunks
from farscope.proto import farscope_pb2 as pb

SIZES = [0, 1, 127, 128, 300, 16_384, (1 << 20) + 3]


@pytest.mark.parametrize("size", SIZES)
def test_a_graph_chunk_is_what_protobuf_writes_and_reads_back(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    raw = chunks.graph_chunk(memoryview(data))
    assert raw == pb.ExecuteRequest(graph_chunk=data).SerializeToString()
    assert pb.ExecuteRequest.FromString(raw).graph_chunk == data
    view = chunks.read_graph_chunk(raw)
    assert isinstance(view, memoryview) and bytes(view) == data


@pytest.mark.parametrize("blob", [0, 1, 300])
@pytest.mark.parametrize("offset", [0, 5, 1 << 33])
@pytest.mark.parametrize("size", SIZES)
def test_a_result_chunk_is_what_protobuf_writes_and_reads_back(blob: int, offset: int, size: int) -> None:
    data = bytes(i % 253 for i in range(size))
    raw = chunks.chunk_event(blob, offset, memoryview(data))
    message = pb.ExecuteEvent(chunk=pb.ResultChunk(blob=blob, offset=offset, data=data))
    assert raw == message.SerializeToString()
    parsed = chunks.read_chunk_event(message.SerializeToString())
    assert parsed is not None and parsed.WhichOneof("event") == "chunk"
    assert (parsed.chunk.blob, parsed.chunk.offset, bytes(parsed.chunk.data)) == (blob, offset, data)
    assert parsed.ByteSize() == message.ByteSize()


def test_other_messages_go_through_protobuf() -> None:
    header = pb.ExecuteRequest(header=pb.RequestHeader(model="m", graph_bytes=10)).SerializeToString()
    assert chunks.read_graph_chunk(header) is None
    assert chunks.request_deserializer(header).header.model == "m"
    for event in (pb.ExecuteEvent(result=pb.ResultHeader(blob_sizes=[3, 4])), pb.ExecuteEvent(done=pb.Done(job_id="j")),
                  pb.ExecuteEvent(log=pb.LogLine(text="hi"))):
        raw = event.SerializeToString()
        assert chunks.read_chunk_event(raw) is None
        assert chunks.event_deserializer(raw) == event
    assert chunks.serializer(pb.JobRequest(job_id="x")) == pb.JobRequest(job_id="x").SerializeToString()
    assert chunks.serializer(b"raw") == b"raw"


def test_chunks_it_cannot_read_exactly_are_left_to_protobuf() -> None:
    inner = pb.ResultChunk(blob=1, offset=2, data=b"abc").SerializeToString()
    unknown_field = pb.ExecuteEvent(chunk=pb.ResultChunk.FromString(inner + b"\x20\x07")).SerializeToString()
    assert chunks.read_chunk_event(unknown_field) is None  # field 4 of ResultChunk: not one it knows
    assert chunks.event_deserializer(unknown_field).chunk.data == b"abc"
    good = pb.ExecuteEvent(chunk=pb.ResultChunk(blob=1, offset=2, data=b"abc")).SerializeToString()
    for cut in range(1, len(good)):
        assert chunks.read_chunk_event(good[:cut]) is None  # truncated: never a short chunk
    two_parts = pb.ExecuteRequest(graph_chunk=b"xy").SerializeToString() * 2
    assert chunks.read_graph_chunk(two_parts) is None
    assert chunks.read_graph_chunk(b"") is None and chunks.read_chunk_event(b"") is None
