"""The wire codec: every value kind survives a round trip; hostile bytes only ever raise ValidationError."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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



# -- every tensor layout -----------------------------------------------------------------------------


def _results_roundtrip(value: object) -> object:
    document, blobs = codec.encode_results({0: value})
    return codec.decode_results(document, [bytearray(blob) for blob in blobs])[0]


def _assert_same_values(out: object, expected: torch.Tensor) -> None:
    """Equal values, dtype and shape; and a plain contiguous tensor, whatever `expected`'s layout."""
    assert isinstance(out, torch.Tensor)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert out.is_contiguous() and out.layout == torch.strided and not out.requires_grad
    assert not out.is_conj() and not out.is_neg()
    assert torch.equal(out, expected.detach())


_BASE = torch.arange(1, 61, dtype=torch.float32).reshape(3, 4, 5)
_COMPLEX = torch.complex(torch.arange(6.0), -torch.arange(6.0) / 2)
_LAYOUTS = {
    "0-d": torch.tensor(3.5),
    "0-d-select": _BASE[1, 2, 3],
    "one-element": torch.tensor([7.0]),
    # The reported bug: a one-element view is "contiguous" whatever its stride, here 5.
    "one-element-stride-5": torch.softmax(_BASE[:, -1], -1)[:1, 2],
    "one-element-strides-0": torch.tensor(2.0).expand(1, 1),
    "empty": torch.empty(0),
    "empty-transposed": torch.empty(0, 3).t(),
    "empty-sliced": _BASE[:, :0],
    "offset-row": _BASE[1, 2],
    "transposed": _BASE.transpose(0, 2),
    "permuted": _BASE.permute(2, 0, 1),
    "column": _BASE[:, :, 1],
    "transposed-slice": _BASE[0, 1:3].t(),
    "stepped": _BASE[::2, 1::2, ::3],
    "narrowed": _BASE.narrow(2, 1, 3),
    "diagonal": _BASE.diagonal(offset=1, dim1=1, dim2=2),
    "expanded": _BASE[:, :1].expand(3, 6, 5),
    "expanded-new-dim": _BASE[0, 0].expand(4, 5),
    "unfolded-overlapping": torch.arange(10.0).unfold(0, 4, 2),
    "flipped": _BASE.flip(0, 2),
    "flipped-stepped": _BASE.flip(1)[:, ::2],
    "requires-grad": torch.randn(2, 3, generator=torch.Generator().manual_seed(1), requires_grad=True),
    "requires-grad-view": torch.ones(4, 3, requires_grad=True).t()[1:],
    "conj": _COMPLEX.conj(),
    "conj-strided": _COMPLEX.conj()[::2],
    "neg-bit": _COMPLEX.conj().imag,
    "neg-bit-contiguous": torch.tensor([1.0, -2.0, 3.0])._neg_view(),
    "bool-transposed": (_BASE > 30).transpose(0, 1),
    "int64-stepped": torch.arange(40).reshape(5, 8)[::2, ::3],
    "int8-column": torch.arange(-12, 12, dtype=torch.int8).reshape(4, 6)[:, 5],
    "uint8-expanded": torch.tensor([255], dtype=torch.uint8).expand(3, 4),
    "float16-transposed": _BASE.to(torch.float16).transpose(1, 2),
    "bfloat16-last": torch.softmax(_BASE.to(torch.bfloat16)[:, -1], -1)[:, 4],
    "complex-real-view": torch.view_as_real(_COMPLEX)[:, 1],
}


@pytest.mark.parametrize("name", list(_LAYOUTS))
def test_every_layout_round_trips_as_its_values_in_requests_and_results(name: str) -> None:
    tensor = _LAYOUTS[name]
    _assert_same_values(_roundtrip(tensor), tensor)
    _assert_same_values(_results_roundtrip(tensor), tensor)


def test_the_lazy_bits_are_really_set_on_the_layouts_that_test_them() -> None:
    # Otherwise the conj / neg cases above would test nothing.
    assert _LAYOUTS["conj"].is_conj() and _LAYOUTS["conj-strided"].is_conj()
    assert _LAYOUTS["neg-bit"].is_neg() and _LAYOUTS["neg-bit-contiguous"].is_neg()
    assert _LAYOUTS["neg-bit-contiguous"].is_contiguous()
    assert _LAYOUTS["one-element-stride-5"].stride() == (5,) and _LAYOUTS["one-element-stride-5"].is_contiguous()


def test_flip_copies_so_no_negative_stride_reaches_the_wire() -> None:
    # torch has no negative strides: flip() returns a fresh tensor, which travels like any other.
    flipped = _BASE.flip(0)
    assert all(s > 0 for s in flipped.stride()) and flipped.data_ptr() != _BASE.data_ptr()
    _assert_same_values(_roundtrip(flipped), flipped)


def test_contiguous_tensors_are_sent_from_their_own_memory() -> None:
    base = torch.zeros(4, 5)
    for view in (base, base[1], base[1:3], base[2, 3:4], torch.softmax(torch.zeros(1, 3, 5)[:, -1], -1)[:, 2]):
        (blob,) = codec.encode_results(view)[1]
        view.fill_(9.0)  # written after encoding: a blob that is a view of the tensor sees it
        assert torch.equal(torch.frombuffer(bytearray(blob), dtype=torch.float32), view.reshape(-1))


def test_non_contiguous_tensors_are_copied_and_leave_the_original_untouched() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    view = base.t()
    (blob,) = codec.encode_results(view)[1]
    expected = view.contiguous().reshape(-1).clone()
    base.fill_(-1.0)
    assert torch.equal(torch.frombuffer(bytearray(blob), dtype=torch.float32), expected)


def test_meta_tensors_are_refused_by_name_in_requests_and_results() -> None:
    meta = torch.empty(2, 3, device="meta")
    with pytest.raises(TypeError, match="meta device"):
        codec.encode({"x": meta})
    with pytest.raises(TypeError, match=r"meta device \(shape \[2\], torch.float32\)"):
        codec.encode_results({0: meta[:, 1]})


# Random views of random tensors: values, not just "no crash". Small tensors, a fixed example sequence.
_VIEW_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]


@st.composite
def _random_views(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(_VIEW_DTYPES))
    # sampled_from draws sizes evenly (integers() favours the smallest); slicing and narrowing make
    # empty and one-element views, selecting makes 0-d ones.
    shape = tuple(draw(st.lists(st.sampled_from([3, 4, 2, 5, 1]), min_size=1, max_size=4)))
    tensor = _sample(dtype, shape)
    if dtype.is_floating_point and draw(st.booleans()):
        tensor.requires_grad_()
    for _ in range(draw(st.integers(1, 4))):
        tensor = draw(st.sampled_from(_VIEW_OPS))(draw, tensor)
    return _view_conj_or_neg(draw, tensor)


def _draw_dim(draw: st.DrawFn, tensor: torch.Tensor) -> int:
    return draw(st.integers(0, tensor.dim() - 1))


def _view_slice(draw: st.DrawFn, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t
    dim = _draw_dim(draw, t)
    size = t.shape[dim]
    start = draw(st.integers(-size, max(size - 1, 0)))  # from either end
    stop = draw(st.one_of(st.none(), st.integers(-size, size)))
    index = [slice(None)] * dim + [slice(start, stop, draw(st.integers(1, 3)))]
    return t[tuple(index)]


def _view_select(draw: st.DrawFn, t: torch.Tensor) -> torch.Tensor:
    sizes = [d for d in range(t.dim()) if t.shape[d] > 0]
    if not sizes:
        return t
    dim = draw(st.sampled_from(sizes))
    return t.select(dim, draw(st.integers(-t.shape[dim], t.shape[dim] - 1)))


def _view_permute(draw: st.DrawFn, t: torch.Tensor) -> torch.Tensor:
    return t.permute(draw(st.permutations(range(t.dim()))))


def _view_transpose(draw: st.DrawFn, t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 0 else t.transpose(_draw_dim(draw, t), _draw_dim(draw, t))


def _view_narrow(draw: st.DrawFn, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t
    dim = _draw_dim(draw, t)
    start = draw(st.integers(0, t.shape[dim]))
    return t.narrow(dim, start, draw(st.integers(0, t.shape[dim] - start)))


def _view_expand(draw: st.DrawFn, t: torch.Tensor) -> torch.Tensor:
    if t.dim() >= 4:
        return t
    t = t.unsqueeze(draw(st.integers(0, t.dim())))  # stride 0 along the new size-1 dim once expanded
    sizes = [draw(st.integers(1, 3)) if s == 1 else -1 for s in t.shape]
    return t.expand(*sizes)


def _view_diagonal(draw: st.DrawFn, t: torch.Tensor) -> torch.Tensor:
    if t.dim() < 2:
        return t
    dim1, dim2 = draw(st.permutations(range(t.dim())))[:2]
    return t.diagonal(offset=draw(st.integers(-2, 2)), dim1=dim1, dim2=dim2)


def _view_flip(draw: st.DrawFn, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t
    return t.flip(draw(st.lists(st.integers(0, t.dim() - 1), min_size=1, max_size=t.dim(), unique=True)))


def _view_unfold(draw: st.DrawFn, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0 or t.dim() >= 4:
        return t
    dim = _draw_dim(draw, t)
    window = draw(st.integers(min(1, t.shape[dim]), t.shape[dim]))
    return t.unfold(dim, window, draw(st.integers(1, 2)))  # overlapping windows


def _view_conj_or_neg(draw: st.DrawFn, t: torch.Tensor) -> torch.Tensor:
    if not t.dtype.is_complex:
        return t
    conj = t.conj()
    return draw(st.sampled_from([t, conj, conj.imag, torch.view_as_real(t)]))  # conj bit, neg bit, real view


_VIEW_OPS = [_view_slice, _view_select, _view_permute, _view_transpose, _view_narrow, _view_expand,
             _view_diagonal, _view_flip, _view_unfold]


@settings(max_examples=200, derandomize=True, deadline=None)
@given(_random_views())
def test_random_views_of_random_tensors_round_trip_exactly(tensor: torch.Tensor) -> None:
    _assert_same_values(_roundtrip(tensor), tensor)
    _assert_same_values(_results_roundtrip(tensor), tensor)

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


@pytest.mark.parametrize("code", [0, 15, 42, 99, 127])
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
