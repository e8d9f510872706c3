"""The wire codec: every value kind survives a round trip; hostile bytes only ever raise ValidationError."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
import torch

from farscope.interventions import codec
from farscope.interventions.errors import ValidationError
from farscope.interventions.graph import HookPoint, Ref

# Extension codes as documented in codec.py's docstring (the wire contract, spelled out on purpose).
REF, TENSOR, SLICE, ELLIPSIS, DTYPE, TUPLE, HOOK, BLOB, SIZE, NAMED, OPAQUE, RECORD = range(1, 13)


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _ext(code: int, payload: object) -> msgpack.ExtType:
    return msgpack.ExtType(code, _pack(payload))


def _roundtrip(value: object) -> object:
    return codec.decode(codec.encode(value))


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def _same_tensor(a: object, b: torch.Tensor) -> None:
    assert isinstance(a, torch.Tensor)
    assert a.dtype == b.dtype and a.shape == b.shape
    # Bitwise: -0.0, NaN payloads and bfloat16 rounding must all survive unchanged.
    assert torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(codec.DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 3), (2, 3, 4)], ids=str)
def test_tensor_round_trip_every_dtype_and_shape(name: str, shape: tuple[int, ...]) -> None:
    tensor = _sample(codec.DTYPES[name], shape)
    _same_tensor(_roundtrip(tensor), tensor)


def test_special_float_values_round_trip_bitwise() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        t = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 65504.0]).to(dtype)
        _same_tensor(_roundtrip(t), t)


def test_non_contiguous_and_sliced_tensors_round_trip_as_their_values() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    for view in (base.transpose(0, 2), base[:, 1], base[..., ::2], base.expand(3, 2, 3, 4)):
        out = _roundtrip(view)
        assert torch.equal(out, view) and out.is_contiguous()


def test_decoded_tensors_are_writable_and_do_not_alias_the_document() -> None:
    data = codec.encode(torch.zeros(4))
    out = codec.decode(data)
    out += 1  # a read-only buffer would warn or fail here
    assert torch.equal(codec.decode(data), torch.zeros(4))


def test_sparse_tensors_travel_dense() -> None:
    dense = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    out = _roundtrip(dense.to_sparse())
    assert out.layout == torch.strided and torch.equal(out, dense)


@pytest.mark.parametrize("dtype", list(codec.DTYPES.values()), ids=str)
def test_dtype_round_trip(dtype: torch.dtype) -> None:
    assert _roundtrip(dtype) is dtype


@pytest.mark.parametrize(
    "value",
    [
        Ref(0),
        Ref(12345),
        HookPoint("model.layers.0.mlp", "output"),
        HookPoint("", "inputs"),
        slice(None),
        slice(1, None, 2),
        slice(-1, None),
        slice(Ref(3), Ref(4), None),
        Ellipsis,
        torch.Size([]),
        torch.Size([2, 0, 5]),
        None,
        True,
        False,
        0,
        -(2**63),
        2**64 - 1,
        1.5,
        "ünïcödé ✓",
        b"\x00\xff",
    ],
    ids=repr,
)
def test_scalar_like_values_round_trip(value: object) -> None:
    out = _roundtrip(value)
    assert out == value and type(out) is type(value)


def test_tuples_and_lists_stay_distinct_at_every_depth() -> None:
    value = [(1, [2, (3,)]), [], (), ([],), [()]]
    out = _roundtrip(value)
    assert out == value
    assert type(out) is list and type(out[0]) is tuple and type(out[0][1]) is list
    assert type(out[0][1][1]) is tuple and type(out[1]) is list and type(out[2]) is tuple
    assert type(out[3]) is tuple and type(out[3][0]) is list and type(out[4][0]) is tuple


def test_size_is_not_decoded_as_a_plain_tuple() -> None:
    out = _roundtrip((torch.Size([2, 3]), (2, 3)))
    assert type(out[0]) is torch.Size and type(out[1]) is tuple


def test_return_types_round_trip_with_their_field_names() -> None:
    x = torch.tensor([[1.0, 5.0, 3.0], [4.0, 2.0, 6.0]])
    for value in (x.topk(2), x.max(dim=1), x.sort(dim=1)):
        out = _roundtrip(value)
        assert type(out) is type(value)
        assert torch.equal(out.values, value.values) and torch.equal(out.indices, value.indices)


def test_nested_dicts_with_every_kind_inside() -> None:
    t = torch.randn(2, 3).to(torch.bfloat16)
    value = {
        "version": 1,
        "a": {"b": {"c": [Ref(1), (slice(None), Ellipsis, 0), {"d": t}]}},
        "dtype": torch.float16,
        "hook": HookPoint("lm_head", "output"),
        "": {},
    }
    out = _roundtrip(value)
    inner = out["a"]["b"]["c"]
    assert inner[0] == Ref(1) and inner[1] == (slice(None), Ellipsis, 0)
    _same_tensor(inner[2]["d"], t)
    assert out["dtype"] is torch.float16 and out["hook"] == value["hook"] and out[""] == {}


def test_a_whole_graph_document_round_trips() -> None:
    from farscope.interventions.graph import Graph, to_document

    graph = Graph(invokes=["The Eiffel Tower is in", [[1, 2, 3]], torch.tensor([[4, 5]])])
    read = graph.add("read", (HookPoint("model.layers.0", "output"),), {"invoke": 0}, "x.py:3")
    add = graph.add("add", (Ref(read.id), torch.ones(64)), where="x.py:4")
    graph.add("setitem", (Ref(add.id), (slice(None), -1), 0.0), where="x.py:5")
    graph.add("save", (Ref(add.id),), where="x.py:6")
    document = to_document(graph)
    out = _roundtrip(document)
    assert out["version"] == document["version"] and out["invokes"][:2] == document["invokes"][:2]
    assert torch.equal(out["invokes"][2], document["invokes"][2])
    for got, sent in zip(out["nodes"], document["nodes"], strict=True):
        assert got[0] == sent[0] and got[2] == sent[2] and got[3] == sent[3]
        assert type(got[1]) is tuple and len(got[1]) == len(sent[1])


def test_results_put_tensor_bytes_in_blobs() -> None:
    a = _sample(torch.bfloat16, (2, 3))
    b = _sample(torch.int64, (4,))
    empty = torch.empty(0, 7)
    scalar = torch.tensor(2.5, dtype=torch.float64)
    saved = {3: a, 7: {"pair": (b, empty)}, 9: scalar, 11: [1, "x", None], 12: a.topk(1)}
    document, blobs = codec.encode_results(saved)
    assert len(blobs) == 6  # a, b, empty, scalar, topk's values and indices
    assert a.numel() * 2 + b.numel() * 8 + 8 <= sum(blob.nbytes for blob in blobs)
    assert len(document) < 400  # tensor bytes are not inline
    out = codec.decode_results(document, [bytearray(blob) for blob in blobs])
    assert set(out) == {3, 7, 9, 11, 12}  # int keys: results are keyed by node id
    _same_tensor(out[3], a)
    _same_tensor(out[7]["pair"][0], b)
    _same_tensor(out[7]["pair"][1], empty)
    _same_tensor(out[9], scalar)
    assert out[11] == [1, "x", None]
    assert type(out[12]) is type(a.topk(1)) and torch.equal(out[12].indices, a.topk(1).indices)


def test_results_carry_records_and_opaque_objects() -> None:
    class CausalLMOutput(dict):
        pass

    class Cache:
        def __repr__(self) -> str:
            return "Cache(layers=2)"

    logits = torch.randn(1, 2, 5)
    document, blobs = codec.encode_results({0: CausalLMOutput(logits=logits), 1: Cache()})
    out = codec.decode_results(document, [bytearray(b) for b in blobs])
    assert isinstance(out[0], codec.Record) and out[0].type_name == "CausalLMOutput"
    assert torch.equal(out[0].logits, logits) and torch.equal(out[0]["logits"], logits)
    with pytest.raises(AttributeError, match="logits"):
        out[0].loss  # noqa: B018
    assert isinstance(out[1], codec.Opaque) and out[1].summary == "Cache(layers=2)"
    assert out[1].type_name.endswith("Cache")


def test_results_refuse_a_blob_index_out_of_range() -> None:
    document = _pack({0: _ext(BLOB, ["float32", [1], 1])})
    with pytest.raises(ValidationError, match="out of range"):
        codec.decode_results(document, [bytearray(4)])


# -- malformed input: ValidationError and nothing else -----------------------------------------------


def _good_document() -> bytes:
    return codec.encode({
        "version": 1,
        "invokes": ["hello", [[1, 2]]],
        "nodes": [
            ["read", (HookPoint("model.layers.0", "output"),), {"invoke": 0}, "t.py:1"],
            ["add", (Ref(0), torch.ones(3, dtype=torch.bfloat16)), {}, "t.py:2"],
            ["getitem", (Ref(1), (slice(None), -1, Ellipsis)), {}, ""],
            ["Tensor.to", (Ref(2), torch.float16), {}, ""],
            ["Tensor.view", (Ref(3), torch.Size([2, 3])), {}, ""],
        ],
    })


def _only_validation_error(data: bytes) -> bool:
    """True if `data` decoded; False if it raised ValidationError; fails the test on anything else."""
    try:
        codec.decode(data)
    except ValidationError:
        return False
    except BaseException as e:  # the point: nothing else may escape
        pytest.fail(f"decode({data[:40]!r}...) raised {type(e).__name__}: {e}")
    return True


def test_every_truncation_of_a_document_is_rejected() -> None:
    data = _good_document()
    assert codec.decode(data)
    for end in range(len(data)):
        with pytest.raises(ValidationError):
            codec.decode(data[:end])


def test_trailing_garbage_is_rejected() -> None:
    with pytest.raises(ValidationError):
        codec.decode(_good_document() + b"\x00")


def test_random_bytes_only_ever_raise_validation_error() -> None:
    rng = random.Random(1234)
    decoded = 0
    for _ in range(3000):
        decoded += _only_validation_error(rng.randbytes(rng.randrange(0, 96)))
    # Most random strings are not msgpack at all; the few that are happen to be plain values.
    assert decoded < 3000


def test_mutated_documents_only_ever_raise_validation_error() -> None:
    rng = random.Random(4321)
    good = _good_document()
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)):]
        _only_validation_error(bytes(data))


@pytest.mark.parametrize("code", [0, 14, 42, 99, 127])
@pytest.mark.parametrize("payload", [b"", _pack([1, 2, 3])], ids=["empty", "list"])
def test_unknown_extension_codes_are_rejected(code: int, payload: bytes) -> None:
    with pytest.raises(ValidationError, match=f"unknown extension type {code}"):
        codec.decode(_pack([1, msgpack.ExtType(code, payload)]))


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes"),
    [
        ("float32", [3], 8),
        ("float32", [3], 16),
        ("float32", [2, 2], 12),
        ("bfloat16", [4], 4),
        ("bool", [], 0),
        ("float32", [0], 4),
        ("int64", [], 4),
        ("complex64", [1], 4),
    ],
)
def test_tensor_whose_shape_and_bytes_disagree_is_rejected(dtype: str, shape: list[int], nbytes: int) -> None:
    with pytest.raises(ValidationError, match="needs .* bytes"):
        codec.decode(_pack(_ext(TENSOR, [dtype, shape, b"\x00" * nbytes])))


@pytest.mark.parametrize("shape", [[-1], [2, -3], [-(2**63)], [True], [1.0], ["2"], [None], 3, "3", {"a": 1}])
def test_tensor_with_a_bad_shape_is_rejected(shape: object) -> None:
    with pytest.raises(ValidationError, match="shape"):
        codec.decode(_pack(_ext(TENSOR, ["float32", shape, b""])))


def test_tensor_with_too_many_dimensions_is_rejected() -> None:
    with pytest.raises(ValidationError, match="dimensions"):
        codec.decode(_pack(_ext(TENSOR, ["uint8", [1] * 17, b"\x00"])))


@pytest.mark.parametrize("shape", [[10**12], [10**6, 10**6], [2**62, 2**62], [2**63 - 1] * 4, [0, 2**63 - 1]])
def test_tensor_claiming_huge_sizes_is_rejected_without_allocating(shape: list[int]) -> None:
    # [0, 2**63-1] has no elements, yet one byte arrives: the byte count must still match.
    with pytest.raises(ValidationError, match="needs"):
        codec.decode(_pack(_ext(TENSOR, ["float32", shape, b"\x00"])))


@pytest.mark.parametrize("dtype", ["float128", "object", "complex128", "uint16", "float8_e4m3fn", "", 5, None, ["x"]])
def test_unknown_dtypes_are_rejected(dtype: object) -> None:
    with pytest.raises(ValidationError, match="dtype"):
        codec.decode(_pack(_ext(TENSOR, [dtype, [1], b"\x00" * 16])))
    with pytest.raises(ValidationError):
        codec.decode(_pack(_ext(DTYPE, dtype)))


@pytest.mark.parametrize(
    "payload",
    [
        [-1],
        [1, -2],
        [2**63],
        [2**64 - 1],
        [True],
        [1.5],
        "12",
        None,
    ],
    ids=repr,
)
def test_size_with_bad_entries_is_rejected(payload: object) -> None:
    with pytest.raises(ValidationError, match="size"):
        codec.decode(_pack(_ext(SIZE, payload)))


@pytest.mark.parametrize(
    "ext",
    [
        _ext(REF, -1),
        _ext(REF, True),
        _ext(REF, "3"),
        _ext(REF, [1]),
        _ext(TENSOR, ["float32", [1]]),
        _ext(TENSOR, ["float32", [1], "abcd"]),
        _ext(TENSOR, {"dtype": "float32"}),
        _ext(SLICE, [1, 2]),
        _ext(SLICE, {"start": 1}),
        _ext(TUPLE, 5),
        _ext(TUPLE, {"a": 1}),
        _ext(HOOK, ["model"]),
        _ext(HOOK, [1, "output"]),
        _ext(DTYPE, ["float32"]),
        _ext(NAMED, ["topk", [1]]),
        _ext(NAMED, ["os", [1, 2]]),
        _ext(NAMED, ["__import__", [1, 2]]),
        _ext(NAMED, [["topk"], [1, 2]]),
        _ext(RECORD, ["Out", [1]]),
        _ext(BLOB, ["float32", [1], 0]),  # blobs are only valid in results
        _ext(OPAQUE, ["os.system", "x"]),  # opaque values are only valid in results
    ],
    ids=lambda e: f"ext{e.code}:{msgpack.unpackb(e.data, raw=False)!r}",
)
def test_extension_payloads_of_the_wrong_shape_are_rejected(ext: msgpack.ExtType) -> None:
    with pytest.raises(ValidationError):
        codec.decode(_pack([ext]))


def test_non_string_map_keys_are_rejected_in_requests() -> None:
    with pytest.raises(ValidationError):
        codec.decode(_pack({1: "a"}))
    with pytest.raises(ValidationError):
        codec.decode(_pack({_ext(TUPLE, [1]): "a"}))


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k", b"\xdd\x00\x00\x00\x01"], ids=["list", "map", "array32"])
def test_msgpack_nested_a_hundred_thousand_deep_is_rejected(opener: bytes) -> None:
    with pytest.raises(ValidationError):
        codec.decode(opener * 10**5 + b"\xc0")


def _ext_in_ext(depth: int, code: int, core: bytes) -> bytes:
    """`depth` extension values each wrapping the next, built in linear time (headers are prepended)."""
    headers: list[bytes] = []
    size = len(core)
    for _ in range(depth):
        if size < 1 << 8:
            header = struct.pack(">BBb", 0xC7, size, code)
        elif size < 1 << 16:
            header = struct.pack(">BHb", 0xC8, size, code)
        else:
            header = struct.pack(">BIb", 0xC9, size, code)
        headers.append(header)
        size += len(header)
    return b"".join(reversed(headers)) + core


@pytest.mark.parametrize("code", [TUPLE, REF, SIZE, 99])
def test_extensions_nested_a_hundred_thousand_deep_are_rejected(code: int) -> None:
    data = _ext_in_ext(10**5, code, _pack([]))
    with pytest.raises(ValidationError):
        codec.decode(data)


def test_tuples_nested_just_below_the_depth_limit_decode() -> None:
    value: object = ()  # the document is one level, each tuple one more
    for _ in range(codec.MAX_DEPTH - 2):
        value = (value,)
    assert _roundtrip(value) == value
    with pytest.raises(ValidationError, match="deeper"):
        codec.decode(codec.encode((value,)))


def test_lists_inside_nested_extensions_are_rejected() -> None:
    # Each extension payload is a fresh msgpack document: list depth must not reset at every level.
    core = b"\x91" * 900 + b"\xc0"
    data = core
    for _ in range(60):
        data = b"\x91" * 900 + _pack(msgpack.ExtType(TUPLE, data))
    with pytest.raises(ValidationError):
        codec.decode(data)


# -- what cannot be encoded ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        object(),
        {1, 2},
        frozenset(),
        lambda: 1,
        len,
        type,
        1 + 2j,
        2**64,
        -(2**63) - 1,
        [0, 2**100],
        torch.ones(2, dtype=torch.complex128),
        torch.ones(2, dtype=torch.uint16),
        torch.float8_e4m3fn,
        torch.nn.Linear(1, 1),
        {"a": {"b": [object()]}},
        range(3),
    ],
    ids=lambda v: type(v).__name__,
)
def test_unencodable_values_raise_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        codec.encode(value)
