"""The wire codec: msgpack documents whose typed values travel as msgpack extension types.

Requests carry their tensors inline (dtype + shape + raw little-endian bytes). Results put each
tensor's bytes in a separate *blob*, so the server can stream a large value in chunks without copying
it into one message, and the client can assemble it in place. Nothing here ever unpickles or imports
anything: a document can only ever decode into the types listed below.

Extension codes (payloads are msgpack themselves):

    1 Ref        int node id
    2 Tensor     [dtype, shape, bytes]          (inline)
    3 slice      [start, stop, step]
    4 Ellipsis   empty
    5 dtype      name, e.g. "float32"
    6 tuple      list
    7 HookPoint  [module path, point]
    8 Blob       [dtype, shape, blob index]     (results: bytes in blob `index`)
    9 Size       list of ints (torch.Size)
   10 named      [name, list]: a torch.return_types tuple (topk, max, sort, ...), so `.indices` works
   11 Opaque     [type name, short repr] (results only): a server object that cannot travel, such as
                 a KV cache inside a module's kwargs, shown for what it is instead of failing the job
   12 Record     [type name, map]: a model output (`CausalLMOutputWithPast`); decodes to a dict whose
                 keys also read as attributes, so `out.logits` works after the trace
   13 Uploaded   [digest, dtype, shape] (requests): a large tensor the server already holds (uploads.py)
   14 Attached   [dtype, shape] (requests): a large tensor whose bytes follow the document (below)

A request body is one msgpack document, then the raw bytes of each large tensor it sends (code 14), in
the order the document names them, back to back. The sender hands the document and those tensors'
own memory to the transport (`encode_request`), which slices them into messages: no copy is made to
build the body. The receiver builds each such tensor over its share of the body it received.

Each kind of value has one small `_encode_*` function and each code one small `_decode_*` function;
`_ENCODERS` (Python type -> encoder, first match wins) and `_DECODERS` (code -> decoder) are the only
dispatch. A decoder receives its payload's bytes and checks every field before building anything.

A tensor travels as its values in row-major order, whatever its layout: a view with any strides (a
transposed slice, a column, an expanded view, a one-element view whose stride is not 1), a conjugated
or negated view, a sparse tensor or one that requires grad. It always arrives as a fresh, contiguous,
writable CPU tensor. A dense contiguous CPU tensor is sent from its own memory, without a copy.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

import msgpack
import torch

from .errors import ValidationError
from .graph import HookPoint, Ref
from .uploads import UPLOAD_THRESHOLD, UploadStore, digest

__all__ = [
    "CHUNK_BYTES",
    "BULK_CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "DTYPES",
    "encode",
    "encode_request",
    "decode",
    "encode_results",
    "decode_results",
    "tensor_bytes",
    "tensor_from_bytes",
    "MAX_DEPTH",
    "Opaque",
    "Record",
]

(_REF, _TENSOR, _SLICE, _ELLIPSIS, _DTYPE, _TUPLE, _HOOK, _BLOB, _SIZE, _NAMED, _OPAQUE, _RECORD,
 _UPLOADED, _ATTACHED) = range(1, 15)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# torch's named results (values, indices) that may travel; looked up by name, never imported.
_RETURN_TYPES = {
    name: getattr(torch.return_types, name)
    for name in ("topk", "max", "min", "sort", "kthvalue", "mode", "median", "aminmax", "cummax", "cummin")
    if hasattr(torch.return_types, name)
}
_RETURN_TYPE_NAMES = {kind: name for name, kind in _RETURN_TYPES.items()}

# Values larger than this travel as several messages (graph chunks, result chunks, tokenizer files);
# every message stays far below gRPC's 4 MiB default, and both sides allow up to 8 chunks a message.
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 8 * CHUNK_BYTES
# Chunks of tensor bytes (results, request bodies) are larger: fewer messages, less per-message cost
# in Python and gRPC. A message stays under gRPC's default 4 MiB cap, so any gRPC client can read it.
BULK_CHUNK_BYTES = 4 * CHUNK_BYTES - 4096

# Deeper than any real argument; shallow enough that hostile nesting cannot exhaust the stack.
MAX_DEPTH = 48

# A tensor has at most this many dimensions on the wire (torch itself allows 64).
MAX_DIMS = 16

if sys.byteorder != "little":  # the wire is little-endian and tensors are sent as their memory
    raise ImportError("farscope's codec supports little-endian machines only")


# -- tensors <-> bytes -----------------------------------------------------------------------------


def _dense_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a plain strided, contiguous CPU tensor: itself when it already is one."""
    if tensor.is_meta:
        raise TypeError(f"a tensor on the meta device (shape {list(tensor.shape)}, {tensor.dtype}) has no "
                        "values and cannot be sent")
    if tensor.layout != torch.strided:  # sparse and other layouts travel as their dense values
        tensor = tensor.to_dense()
    # Conjugate and negative bits are lazy views: their memory holds the values before conj()/neg().
    return tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements in row-major order as raw little-endian bytes.

    A view of the tensor's own memory when it is a dense contiguous CPU tensor; a copy otherwise.
    """
    dense = _dense_cpu(tensor)
    # A contiguous tensor's elements are its `numel` consecutive items from its storage offset. Saying so
    # with as_strided (a view, no copy) matters for one-element views, which count as contiguous whatever
    # their stride (`softmax(x[:, -1])[:, i]` of a batch of one) and which `view(torch.uint8)` refuses.
    flat = dense.as_strided((dense.numel(),), (1,))
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _is_count(value: Any) -> bool:
    """A non-negative int that is not a bool (`True` is an int to Python, not to the wire)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_from_bytes(dtype_name: Any, shape: Any, data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A tensor from its wire form, refusing any disagreement between dtype, shape and byte count."""
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ValidationError(f"unknown tensor dtype {dtype_name!r}; accepted: {', '.join(DTYPES)}")
    if not isinstance(shape, (list, tuple)) or not all(_is_count(s) for s in shape):
        raise ValidationError(f"tensor shape must be a list of non-negative ints, got {shape!r}")
    if len(shape) > MAX_DIMS:
        raise ValidationError(f"tensor has {len(shape)} dimensions; at most {MAX_DIMS} are accepted")
    dtype = DTYPES[dtype_name]
    numel = math.prod(shape)  # exact (Python ints): a huge claimed shape cannot overflow past the check
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(data):
        raise ValidationError(
            f"tensor of shape {list(shape)} and dtype {dtype_name} needs {numel * itemsize} bytes, "
            f"got {len(data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    writable = isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly)
    buffer = data if writable else bytearray(data)  # a tensor over read-only memory could not be edited
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


# -- result-only value kinds -----------------------------------------------------------------------


@dataclass(frozen=True)
class Opaque:
    """Stands in, on the client, for a server object that cannot be sent (e.g. a KV cache)."""

    type_name: str
    summary: str

    def __repr__(self) -> str:
        return f"<opaque {self.type_name}: {self.summary}>"


class Record(dict):
    """A model output on the client: a dict whose keys also read as attributes (`out.logits`)."""

    def __init__(self, type_name: str, fields: dict[str, Any]) -> None:
        super().__init__(fields)
        self.type_name = type_name

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{self.type_name} has no field {name!r}; fields: {', '.join(self)}") from None

    def __repr__(self) -> str:
        return f"{self.type_name}({', '.join(f'{k}=...' for k in self)})"


def _short_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:  # a repr that fails must not fail the job
        text = "?"
    return text if len(text) <= 200 else text[:197] + "..."


# -- encoding: one function per kind of value ------------------------------------------------------


class _Encoder:
    def __init__(self, blobs: list[memoryview] | None, known: set[str] | None = None,
                 sent: set[str] | None = None, attached: list[memoryview] | None = None) -> None:
        self.blobs = blobs  # None: a request
        self.known = known  # digests the server holds: large tensors go by digest
        self.sent = sent  # digests of large tensors sent by this document
        self.attached = attached  # a request's large tensors, whose bytes follow the document

    def default(self, obj: Any) -> Any:
        """msgpack's hook for whatever it does not pack itself: the first matching `_ENCODERS` entry."""
        for kind, encode_value in _ENCODERS:
            if isinstance(obj, kind):
                return encode_value(self, obj)
        return _encode_unknown(self, obj)

    def pack(self, obj: Any) -> bytes:
        # strict_types: tuples must reach `default` (they are not lists on the wire).
        return msgpack.packb(obj, default=self.default, strict_types=True, use_bin_type=True)

    def ext(self, code: int, payload: Any) -> msgpack.ExtType:
        return msgpack.ExtType(code, self.pack(payload))


def _encode_ref(enc: _Encoder, ref: Ref) -> msgpack.ExtType:
    return enc.ext(_REF, ref.id)


def _encode_tensor(enc: _Encoder, tensor: torch.Tensor) -> msgpack.ExtType:
    """Inline in requests (or by digest when the server holds it); as a blob in results."""
    if tensor.dtype not in _DTYPE_NAMES:
        raise TypeError(f"tensors of dtype {tensor.dtype} cannot be sent")
    dtype_name, shape = _DTYPE_NAMES[tensor.dtype], list(tensor.shape)
    data = tensor_bytes(tensor)
    if enc.blobs is not None:
        enc.blobs.append(data)
        return enc.ext(_BLOB, [dtype_name, shape, len(enc.blobs) - 1])
    if enc.known is not None and data.nbytes >= UPLOAD_THRESHOLD:
        key = digest(dtype_name, shape, data)
        if key in enc.known:
            return enc.ext(_UPLOADED, [key, dtype_name, shape])
        if enc.sent is not None:
            enc.sent.add(key)
    if enc.attached is not None and data.nbytes >= UPLOAD_THRESHOLD:
        enc.attached.append(data)
        return enc.ext(_ATTACHED, [dtype_name, shape])
    return enc.ext(_TENSOR, [dtype_name, shape, bytes(data)])


def _encode_size(enc: _Encoder, size: torch.Size) -> msgpack.ExtType:
    return enc.ext(_SIZE, list(size))


def _encode_tuple(enc: _Encoder, items: tuple) -> msgpack.ExtType:
    """A tuple, or one of torch's named results (`values`, `indices`) as such."""
    name = _RETURN_TYPE_NAMES.get(type(items))
    if name is not None:
        return enc.ext(_NAMED, [name, list(items)])
    return enc.ext(_TUPLE, list(items))


def _encode_slice(enc: _Encoder, index: slice) -> msgpack.ExtType:
    return enc.ext(_SLICE, [index.start, index.stop, index.step])


def _encode_ellipsis(enc: _Encoder, _: EllipsisType) -> msgpack.ExtType:
    return msgpack.ExtType(_ELLIPSIS, b"")


def _encode_dtype(enc: _Encoder, dtype: torch.dtype) -> msgpack.ExtType:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype {dtype} cannot be sent")
    return enc.ext(_DTYPE, _DTYPE_NAMES[dtype])


def _encode_hook_point(enc: _Encoder, point: HookPoint) -> msgpack.ExtType:
    return enc.ext(_HOOK, [point.module, point.point])


def _encode_mapping(enc: _Encoder, mapping: dict) -> Any:
    """A dict subclass (transformers' ModelOutput): a Record in results, a plain map in requests."""
    if enc.blobs is not None:
        return enc.ext(_RECORD, [type(mapping).__name__, dict(mapping)])
    return dict(mapping)


def _encode_list(enc: _Encoder, items: list) -> list:
    return list(items)  # a list subclass travels as a plain list


def _encode_int(enc: _Encoder, number: int) -> int:
    if not -(1 << 63) <= number < (1 << 64):  # msgpack ints are 64-bit
        raise TypeError(f"the integer {number} does not fit in 64 bits and cannot be sent")
    return int(number)  # an int subclass (IntEnum, ...) travels as a plain int


def _encode_as(kind: type) -> Callable[[_Encoder, Any], Any]:
    """A subclass of a builtin (a str enum, ...) travels as the builtin."""
    return lambda enc, obj: kind(obj)


def _encode_unknown(enc: _Encoder, obj: Any) -> msgpack.ExtType:
    """Shown for what it is in results (a KV cache in a module's kwargs); refused in requests."""
    if enc.blobs is None:
        raise TypeError(f"a value of type {type(obj).__name__} cannot be sent")
    kind = type(obj)
    return enc.ext(_OPAQUE, [f"{kind.__module__}.{kind.__qualname__}", _short_repr(obj)])


# Read in order, first match wins: torch.Size is a tuple, so it comes before tuple.
_ENCODERS: tuple[tuple[type, Callable[[_Encoder, Any], Any]], ...] = (
    (Ref, _encode_ref),
    (torch.Tensor, _encode_tensor),
    (torch.Size, _encode_size),
    (tuple, _encode_tuple),
    (slice, _encode_slice),
    (EllipsisType, _encode_ellipsis),
    (torch.dtype, _encode_dtype),
    (HookPoint, _encode_hook_point),
    (dict, _encode_mapping),
    (list, _encode_list),
    (int, _encode_int),
    (float, _encode_as(float)),
    (str, _encode_as(str)),
    (bytes, _encode_as(bytes)),
)


# -- decoding: one function per extension code -----------------------------------------------------


class _Decoder:
    def __init__(self, blobs: list[Any] | None, uploads: UploadStore | None = None,
                 tail: memoryview | None = None) -> None:
        self.blobs = blobs  # None: a request
        self.uploads = uploads
        self.tail = tail  # a request's bytes after its document: its attached tensors, in order
        self.taken = 0  # how many of them attached tensors have claimed
        self.depth = 0

    def options(self) -> dict[str, Any]:
        return {"ext_hook": self.ext_hook, "raw": False, "use_list": True,
                "strict_map_key": self.blobs is None}  # results are keyed by node id

    def unpack(self, data: bytes) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise ValidationError(f"document nests deeper than {MAX_DEPTH} levels")
            return msgpack.unpackb(data, **self.options())
        finally:
            self.depth -= 1

    def ext_hook(self, code: int, data: bytes) -> Any:
        decode_payload = _DECODERS.get(code)
        if decode_payload is None:
            raise ValidationError(f"unknown extension type {code}")
        return decode_payload(self, data)


def _is_list_of(payload: Any, length: int) -> bool:
    return isinstance(payload, list) and len(payload) == length


def _decode_ref(dec: _Decoder, data: bytes) -> Ref:
    node_id = dec.unpack(data)
    if not _is_count(node_id):
        raise ValidationError(f"node reference must be a non-negative int, got {node_id!r}")
    return Ref(node_id)


def _decode_tensor(dec: _Decoder, data: bytes) -> torch.Tensor:
    payload = dec.unpack(data)
    if not _is_list_of(payload, 3) or not isinstance(payload[2], bytes):
        raise ValidationError("tensor must be [dtype, shape, bytes]")
    dtype_name, shape, raw = payload
    return _request_tensor(dec, dtype_name, shape, raw)


def _request_tensor(dec: _Decoder, dtype_name: str, shape: list[int], raw: Any) -> torch.Tensor:
    """A tensor a request carries, built over its bytes; a large one is kept in the upload store, so the
    client can send it by digest next time."""
    tensor = tensor_from_bytes(dtype_name, shape, raw)
    if dec.uploads is not None and len(raw) >= UPLOAD_THRESHOLD:
        dec.uploads.put(digest(dtype_name, shape, raw), tensor)
    return tensor


def _decode_attached(dec: _Decoder, data: bytes) -> torch.Tensor:
    """A large tensor whose bytes are the next ones after the document: built over them, no copy."""
    if dec.tail is None:
        raise ValidationError("attached tensors are only valid in requests")
    payload = dec.unpack(data)
    if not _is_list_of(payload, 2):
        raise ValidationError("attached tensor must be [dtype, shape]")
    dtype_name, shape = payload
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ValidationError(f"unknown tensor dtype {dtype_name!r}; accepted: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape) or len(shape) > MAX_DIMS:
        raise ValidationError(f"attached tensor shape must be a list of at most {MAX_DIMS} non-negative ints")
    size = math.prod(shape) * DTYPES[dtype_name].itemsize
    start = dec.taken
    if start + size > len(dec.tail):
        raise ValidationError(f"attached tensor of {size} bytes runs past the request's end "
                              f"({len(dec.tail) - start} bytes left)")
    dec.taken = start + size
    return _request_tensor(dec, dtype_name, shape, dec.tail[start:start + size])


def _decode_uploaded(dec: _Decoder, data: bytes) -> torch.Tensor:
    payload = dec.unpack(data)
    if not (_is_list_of(payload, 3) and isinstance(payload[0], str)):
        raise ValidationError("uploaded tensor must be [digest, dtype, shape]")
    if dec.uploads is None:
        raise ValidationError("uploaded tensors are only valid in requests to a server")
    key, dtype_name, shape = payload
    tensor = dec.uploads.get(key)
    if dtype_name not in DTYPES or tensor.dtype != DTYPES[dtype_name] or list(tensor.shape) != shape:
        raise ValidationError(f"upload {key[:16]}… does not have dtype {dtype_name} and shape {shape}")
    return tensor


def _decode_blob(dec: _Decoder, data: bytes) -> torch.Tensor:
    if dec.blobs is None:
        raise ValidationError("blob references are only valid in results")
    payload = dec.unpack(data)
    if not _is_list_of(payload, 3):
        raise ValidationError("blob must be [dtype, shape, index]")
    dtype_name, shape, index = payload
    if not _is_count(index) or index >= len(dec.blobs):
        raise ValidationError(f"blob index {index!r} out of range")
    return tensor_from_bytes(dtype_name, shape, dec.blobs[index])


def _decode_slice(dec: _Decoder, data: bytes) -> slice:
    payload = dec.unpack(data)
    if not _is_list_of(payload, 3):
        raise ValidationError("slice must be [start, stop, step]")
    return slice(*payload)


def _decode_ellipsis(dec: _Decoder, data: bytes) -> EllipsisType:
    return Ellipsis  # no payload to read


def _decode_tuple(dec: _Decoder, data: bytes) -> tuple:
    payload = dec.unpack(data)
    if not isinstance(payload, list):
        raise ValidationError("tuple must be a list")
    return tuple(payload)


def _decode_named(dec: _Decoder, data: bytes) -> tuple:
    payload = dec.unpack(data)
    if not (_is_list_of(payload, 2) and isinstance(payload[0], str) and payload[0] in _RETURN_TYPES
            and isinstance(payload[1], list)):
        raise ValidationError("named tuple must be [torch.return_types name, list]")
    name, items = payload
    return _RETURN_TYPES[name](items)  # a structseq checks its own length


def _decode_record(dec: _Decoder, data: bytes) -> Record:
    payload = dec.unpack(data)
    if not (_is_list_of(payload, 2) and isinstance(payload[0], str) and isinstance(payload[1], dict)):
        raise ValidationError("record must be [type name, map]")
    return Record(*payload)


def _decode_opaque(dec: _Decoder, data: bytes) -> Opaque:
    if dec.blobs is None:
        raise ValidationError("opaque values are only valid in results")
    payload = dec.unpack(data)
    if not (_is_list_of(payload, 2) and all(isinstance(p, str) for p in payload)):
        raise ValidationError("opaque value must be [type name, repr]")
    return Opaque(*payload)


def _decode_size(dec: _Decoder, data: bytes) -> torch.Size:
    payload = dec.unpack(data)
    if not isinstance(payload, list) or not all(_is_count(s) and s < (1 << 63) for s in payload):
        raise ValidationError("size must be a list of non-negative 64-bit ints")
    return torch.Size(payload)


def _decode_dtype(dec: _Decoder, data: bytes) -> torch.dtype:
    name = dec.unpack(data)
    if not isinstance(name, str) or name not in DTYPES:
        raise ValidationError(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


def _decode_hook_point(dec: _Decoder, data: bytes) -> HookPoint:
    payload = dec.unpack(data)
    if not (_is_list_of(payload, 2) and all(isinstance(p, str) for p in payload)):
        raise ValidationError("hook point must be [module path, point]")
    return HookPoint(*payload)


_DECODERS: dict[int, Callable[[_Decoder, bytes], Any]] = {
    _REF: _decode_ref,
    _TENSOR: _decode_tensor,
    _SLICE: _decode_slice,
    _ELLIPSIS: _decode_ellipsis,
    _DTYPE: _decode_dtype,
    _TUPLE: _decode_tuple,
    _HOOK: _decode_hook_point,
    _BLOB: _decode_blob,
    _SIZE: _decode_size,
    _NAMED: _decode_named,
    _OPAQUE: _decode_opaque,
    _RECORD: _decode_record,
    _UPLOADED: _decode_uploaded,
    _ATTACHED: _decode_attached,
}


# -- the four entry points -------------------------------------------------------------------------


def encode_request(obj: Any, *, known: set[str] | None = None,
                   sent: set[str] | None = None) -> list[bytes | memoryview]:
    """A request body as the pieces that, back to back, make it: the document, then the memory of each
    large tensor it sends (views, not copies: the transport slices them into messages). Large tensors
    whose digest is in `known` go by digest; the digests of those sent are added to `sent` (uploads.py)."""
    attached: list[memoryview] = []
    document = _Encoder(None, known, sent, attached).pack(obj)
    return [document, *attached]


def encode(obj: Any, *, known: set[str] | None = None, sent: set[str] | None = None) -> bytes:
    """A request body in one piece (`encode_request`, joined)."""
    return b"".join(encode_request(obj, known=known, sent=sent))


class _ViewReader:
    """A file over a buffer, for msgpack.Unpacker: it reads the document only as far as it goes, so
    the large tensors after it are never copied."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def read(self, n: int) -> bytes:
        chunk = self.view[self.pos:self.pos + n]
        self.pos += len(chunk)
        return bytes(chunk)


def _decode_request(data: bytes | bytearray | memoryview, uploads: UploadStore | None) -> Any:
    view = memoryview(data).cast("B")
    # Where the document ends is found first (skipping it reads no tensor bytes and calls no hook), as
    # its attached tensors, decoded as it is read, take their bytes from after that end.
    skipper = msgpack.Unpacker(_ViewReader(view), read_size=1 << 16, max_buffer_size=max(len(view), 1 << 16))
    skipper.skip()
    end = skipper.tell()
    decoder = _Decoder(None, uploads, tail=view[end:])
    document = decoder.unpack(view[:end])
    if decoder.taken != len(view) - end:
        raise ValidationError(f"malformed request document: {len(view) - end - decoder.taken} bytes after it "
                              "belong to no attached tensor")
    return document


def decode(data: bytes | bytearray | memoryview, *, uploads: UploadStore | None = None) -> Any:
    """Decode a request body; any malformation raises `ValidationError`, never anything else.

    With `uploads`, large tensors sent are kept there and tensors sent by digest taken from it. Over
    a writable buffer (a bytearray), large tensors are built over its memory, without a copy.
    """
    try:
        return _decode_request(data, uploads)
    except ValidationError:
        raise
    except RecursionError:
        raise ValidationError("document nests too deeply") from None
    except Exception as e:  # msgpack raises a zoo of types for bad bytes
        raise ValidationError(f"malformed request document: {type(e).__name__}: {e}") from None


def encode_results(obj: Any) -> tuple[bytes, list[memoryview]]:
    """A results document plus the raw bytes of each tensor in it, to be streamed in chunks."""
    blobs: list[memoryview] = []
    return _Encoder(blobs).pack(obj), blobs


def decode_results(document: bytes, blobs: list[bytearray]) -> Any:
    try:
        return _Decoder(blobs).unpack(document)
    except ValidationError:
        raise
    except Exception as e:
        raise ValidationError(f"malformed results document from the server: {type(e).__name__}: {e}") from None
