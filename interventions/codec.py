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
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from .errors import ValidationError
from .graph import HookPoint, Ref
from .uploads import UPLOAD_THRESHOLD, UploadStore, digest

__all__ = [
    "CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "DTYPES",
    "encode",
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
 _UPLOADED) = range(1, 14)

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

# Deeper than any real argument; shallow enough that hostile nesting cannot exhaust the stack.
# Values larger than this travel as several messages (graph chunks, result chunks, tokenizer files);
# every message stays far below gRPC's 4 MiB default, and both sides allow up to 8 chunks a message.
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 8 * CHUNK_BYTES

MAX_DEPTH = 48

if sys.byteorder != "little":  # the wire is little-endian and tensors are sent as their memory
    raise ImportError("farscope's codec supports little-endian machines only")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as raw little-endian bytes (no copy when already contiguous on CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_from_bytes(dtype_name: Any, shape: Any, data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A tensor from its wire form, refusing any disagreement between dtype, shape and byte count."""
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ValidationError(f"unknown tensor dtype {dtype_name!r}; accepted: {', '.join(DTYPES)}")
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise ValidationError(f"tensor shape must be a list of non-negative ints, got {shape!r}")
    if len(shape) > 16:
        raise ValidationError(f"tensor has {len(shape)} dimensions; at most 16 are accepted")
    dtype = DTYPES[dtype_name]
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(data):
        raise ValidationError(
            f"tensor of shape {list(shape)} and dtype {dtype_name} needs {numel * itemsize} bytes, "
            f"got {len(data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


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


class _Encoder:
    def __init__(self, blobs: list[memoryview] | None, known: set[str] | None = None,
                 sent: set[str] | None = None) -> None:
        self.blobs = blobs  # None: tensors inline
        self.known = known  # digests the server holds: large tensors go by digest
        self.sent = sent  # digests of large tensors sent inline by this document

    def default(self, obj: Any) -> msgpack.ExtType:
        pack = self.pack
        if isinstance(obj, Ref):
            return msgpack.ExtType(_REF, pack(obj.id))
        if isinstance(obj, torch.Tensor):
            if obj.dtype not in _DTYPE_NAMES:
                raise TypeError(f"tensors of dtype {obj.dtype} cannot be sent")
            if obj.is_sparse or obj.layout != torch.strided:
                obj = obj.to_dense()
            meta = [_DTYPE_NAMES[obj.dtype], list(obj.shape)]
            if self.blobs is None:
                data = tensor_bytes(obj)
                if self.known is not None and data.nbytes >= UPLOAD_THRESHOLD:
                    key = digest(meta[0], meta[1], data)
                    if key in self.known:
                        return msgpack.ExtType(_UPLOADED, pack([key, *meta]))
                    if self.sent is not None:
                        self.sent.add(key)
                return msgpack.ExtType(_TENSOR, pack([*meta, bytes(data)]))
            self.blobs.append(tensor_bytes(obj))
            return msgpack.ExtType(_BLOB, pack([*meta, len(self.blobs) - 1]))
        if isinstance(obj, torch.Size):
            return msgpack.ExtType(_SIZE, pack(list(obj)))
        if isinstance(obj, tuple):
            name = type(obj).__name__
            if type(obj).__module__ == "torch.return_types" and name in _RETURN_TYPES:
                return msgpack.ExtType(_NAMED, pack([name, list(obj)]))
            return msgpack.ExtType(_TUPLE, pack(list(obj)))
        if isinstance(obj, slice):
            return msgpack.ExtType(_SLICE, pack([obj.start, obj.stop, obj.step]))
        if obj is Ellipsis:
            return msgpack.ExtType(_ELLIPSIS, b"")
        if isinstance(obj, torch.dtype):
            if obj not in _DTYPE_NAMES:
                raise TypeError(f"dtype {obj} cannot be sent")
            return msgpack.ExtType(_DTYPE, pack(_DTYPE_NAMES[obj]))
        if isinstance(obj, HookPoint):
            return msgpack.ExtType(_HOOK, pack([obj.module, obj.point]))
        if isinstance(obj, dict):  # dict subclasses, e.g. transformers' ModelOutput
            if self.blobs is not None:
                return msgpack.ExtType(_RECORD, pack([type(obj).__name__, dict(obj)]))
            return dict(obj)
        if isinstance(obj, list):
            return list(obj)
        if isinstance(obj, int) and not -(1 << 63) <= obj < (1 << 64):  # msgpack ints are 64-bit
            raise TypeError(f"the integer {obj} does not fit in 64 bits and cannot be sent")
        for kind in (bool, int, float, str, bytes):  # subclasses of builtins (IntEnum, ...)
            if isinstance(obj, kind):
                return kind(obj)
        if self.blobs is not None:
            kind = type(obj)
            return msgpack.ExtType(_OPAQUE, pack([f"{kind.__module__}.{kind.__qualname__}", _short_repr(obj)]))
        raise TypeError(f"a value of type {type(obj).__name__} cannot be sent")

    def pack(self, obj: Any) -> bytes:
        # strict_types: tuples must reach `default` (they are not lists on the wire).
        return msgpack.packb(obj, default=self.default, strict_types=True, use_bin_type=True)


class _Decoder:
    def __init__(self, blobs: list[Any] | None, uploads: UploadStore | None = None) -> None:
        self.blobs = blobs
        self.uploads = uploads
        self.depth = 0

    def unpack(self, data: bytes) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise ValidationError(f"document nests deeper than {MAX_DEPTH} levels")
            return msgpack.unpackb(
                data,
                ext_hook=self.ext_hook,
                raw=False,
                strict_map_key=self.blobs is None,  # results are keyed by node id
                use_list=True,
            )
        finally:
            self.depth -= 1

    def ext_hook(self, code: int, data: bytes) -> Any:
        if not _REF <= code <= _UPLOADED:
            raise ValidationError(f"unknown extension type {code}")
        if code == _ELLIPSIS:
            return Ellipsis
        payload = self.unpack(data)
        if code == _REF:
            if not isinstance(payload, int) or isinstance(payload, bool) or payload < 0:
                raise ValidationError(f"node reference must be a non-negative int, got {payload!r}")
            return Ref(payload)
        if code == _TENSOR:
            if not isinstance(payload, list) or len(payload) != 3 or not isinstance(payload[2], bytes):
                raise ValidationError("tensor must be [dtype, shape, bytes]")
            tensor = tensor_from_bytes(*payload)
            if self.uploads is not None and len(payload[2]) >= UPLOAD_THRESHOLD:
                self.uploads.put(digest(payload[0], payload[1], payload[2]), tensor)
            return tensor
        if code == _UPLOADED:
            if not (isinstance(payload, list) and len(payload) == 3 and isinstance(payload[0], str)):
                raise ValidationError("uploaded tensor must be [digest, dtype, shape]")
            if self.uploads is None:
                raise ValidationError("uploaded tensors are only valid in requests to a server")
            tensor = self.uploads.get(payload[0])
            dtype, shape = payload[1], payload[2]
            if dtype not in DTYPES or tensor.dtype != DTYPES[dtype] or list(tensor.shape) != shape:
                raise ValidationError(f"upload {payload[0][:16]}… does not have dtype {dtype} and shape {shape}")
            return tensor
        if code == _BLOB:
            if self.blobs is None:
                raise ValidationError("blob references are only valid in results")
            if not isinstance(payload, list) or len(payload) != 3:
                raise ValidationError("blob must be [dtype, shape, index]")
            dtype, shape, index = payload
            if not isinstance(index, int) or not 0 <= index < len(self.blobs):
                raise ValidationError(f"blob index {index!r} out of range")
            return tensor_from_bytes(dtype, shape, self.blobs[index])
        if code == _SLICE:
            if not isinstance(payload, list) or len(payload) != 3:
                raise ValidationError("slice must be [start, stop, step]")
            return slice(*payload)
        if code == _TUPLE:
            if not isinstance(payload, list):
                raise ValidationError("tuple must be a list")
            return tuple(payload)
        if code == _NAMED:
            if not (isinstance(payload, list) and len(payload) == 2 and payload[0] in _RETURN_TYPES
                    and isinstance(payload[1], list)):
                raise ValidationError("named tuple must be [torch.return_types name, list]")
            return _RETURN_TYPES[payload[0]](payload[1])
        if code == _RECORD:
            if not (isinstance(payload, list) and len(payload) == 2 and isinstance(payload[0], str)
                    and isinstance(payload[1], dict)):
                raise ValidationError("record must be [type name, map]")
            return Record(payload[0], payload[1])
        if code == _OPAQUE:
            if self.blobs is None:
                raise ValidationError("opaque values are only valid in results")
            if not (isinstance(payload, list) and len(payload) == 2 and all(isinstance(p, str) for p in payload)):
                raise ValidationError("opaque value must be [type name, repr]")
            return Opaque(payload[0], payload[1])
        if code == _SIZE:
            if not isinstance(payload, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s < (1 << 63) for s in payload
            ):
                raise ValidationError("size must be a list of non-negative 64-bit ints")
            return torch.Size(payload)
        if code == _DTYPE:
            if payload not in DTYPES:
                raise ValidationError(f"unknown dtype {payload!r}; accepted: {', '.join(DTYPES)}")
            return DTYPES[payload]
        if code == _HOOK:
            if not (isinstance(payload, list) and len(payload) == 2 and all(isinstance(p, str) for p in payload)):
                raise ValidationError("hook point must be [module path, point]")
            return HookPoint(payload[0], payload[1])
        raise ValidationError(f"unknown extension type {code}")


def encode(obj: Any, *, known: set[str] | None = None, sent: set[str] | None = None) -> bytes:
    """A request document. Large tensors whose digest is in `known` go by digest; the digests of
    large tensors sent inline are added to `sent` (see uploads.py)."""
    return _Encoder(None, known, sent).pack(obj)


def decode(data: bytes, *, uploads: UploadStore | None = None) -> Any:
    """Decode a request document; any malformation raises `ValidationError`, never anything else.

    With `uploads`, large inline tensors are kept there and tensors sent by digest taken from it.
    """
    try:
        return _Decoder(None, uploads).unpack(data)
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
