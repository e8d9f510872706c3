"""Tensors cross the wire exactly and without intermediate copies: results are assembled in one
buffer per tensor that becomes the tensor's own memory, and request tensors travel as raw bytes after
the document, built over the server's receive buffer. (Speed is measured in bench/transfer.py.)"""

from __future__ import annotations

import pytest
import torch

import farscope
from farscope.client import transport as transport_module
from farscope.interventions import codec
from farscope.interventions.codec import BULK_CHUNK_BYTES
from farscope.interventions.errors import ValidationError

PROMPT = "When Mary and John went to the store"


def _address(buffer: memoryview) -> int:
    return torch.frombuffer(buffer, dtype=torch.uint8).data_ptr() if len(buffer) else 0


@pytest.fixture
def receive_buffers(monkeypatch) -> list[memoryview]:
    """Every result buffer the client allocates, in order."""
    made: list[memoryview] = []
    original = transport_module._receive_buffer

    def spy(size: int) -> memoryview:
        made.append(original(size))
        return made[-1]
    monkeypatch.setattr(transport_module, "_receive_buffer", spy)
    return made


def test_a_large_result_is_exact_and_lives_in_its_receive_buffer(tiny_remote, tiny_local, tiny_tokenizer,
                                                                  receive_buffers):
    m = tiny_remote["llama"]
    copies = 3 * BULK_CHUNK_BYTES // (tiny_local["llama"].config.vocab_size * 4 * 9) + 2  # several chunks each
    with m.trace(PROMPT):
        logits = m.lm_head.output
        big = logits.repeat(copies, 1, 1).save()
        last = logits[:, -1].save()  # a strided view on the server: sent as its values
    ids = tiny_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = tiny_local["llama"](ids).logits
    assert big.value.nbytes > 3 * BULK_CHUNK_BYTES
    assert torch.equal(big.value, reference.repeat(copies, 1, 1))
    assert torch.equal(last.value, reference[:, -1])
    # One buffer per blob (the document, then each tensor), sized by the header; each tensor's storage
    # is its buffer itself, and it is writable and contiguous as any fresh tensor.
    assert [len(b) for b in receive_buffers[1:]] == [big.value.nbytes, last.value.nbytes]
    assert big.value.untyped_storage().data_ptr() == _address(receive_buffers[1])
    assert last.value.untyped_storage().data_ptr() == _address(receive_buffers[2])
    big.value[0, 0, 0] = 1.0
    assert big.value.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_a_large_upload_arrives_exact(tiny_server, dtype):
    # Its own client: the shared ones must not come to hold uploads other tests do not expect.
    m = farscope.RemoteModel("tiny-gpt2", address=f"127.0.0.1:{tiny_server.port}")
    source = torch.randn(3, BULK_CHUNK_BYTES // 8 + 5, generator=torch.Generator().manual_seed(7)) * 1000
    vec = (source > 0 if dtype is torch.bool else source.to(dtype)).T  # non-contiguous: sent as its values
    with m.trace(PROMPT):
        zero = m.transformer.h[0].output[0, 0, 0].to(dtype) * 0
        back = (vec + zero if dtype is not torch.bool else vec | (zero != 0)).save()
    assert m._transport.last_request_bytes > vec.numel() * vec.element_size()
    assert back.value.dtype == dtype and torch.equal(back.value, vec)
    m.close()


def test_request_tensors_are_built_over_the_received_body_without_a_copy():
    big = torch.arange(40_000, dtype=torch.float32)  # over the upload threshold: attached
    small = torch.arange(10, dtype=torch.int64)  # inline in the document
    pieces = codec.encode_request({"a": [big, (small, big[::2])]}, known=set(), sent=set())
    assert len(pieces) == 3 and pieces[1].nbytes == big.nbytes  # the tensor's own memory, then a copy of the view
    assert torch.frombuffer(pieces[1], dtype=torch.uint8).data_ptr() == big.data_ptr()
    body = memoryview(torch.empty(sum(len(p) for p in pieces), dtype=torch.uint8).numpy()).cast("B")
    body[:] = b"".join(pieces)
    decoded = codec.decode(body)
    got_big, (got_small, got_half) = decoded["a"][0], decoded["a"][1]
    assert torch.equal(got_big, big) and torch.equal(got_small, small) and torch.equal(got_half, big[::2])
    start = torch.frombuffer(body, dtype=torch.uint8).data_ptr()
    assert start < got_big.data_ptr() < got_half.data_ptr() < start + len(body)


def test_a_body_whose_tail_does_not_match_its_tensors_is_refused():
    pieces = codec.encode_request([torch.zeros(20_000)], known=None, sent=None)
    whole = b"".join(pieces)
    for body in (whole[:-1], whole + b"\0", pieces[0]):
        with pytest.raises(ValidationError, match="malformed request document|runs past"):
            codec.decode(bytearray(body))
    assert torch.equal(codec.decode(bytearray(whole))[0], torch.zeros(20_000))
