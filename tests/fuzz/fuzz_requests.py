#!/usr/bin/env python
"""Fuzz farscope's request path: hostile graph documents, in-process and over real gRPC.

    python tests/fuzz/fuzz_requests.py --count 100000 --seed 0

Starts a farscope server in this process on 127.0.0.1 (a tiny random Llama, built into a temporary
folder), then generates `--count` payloads (all from `--seed`):

- structured (8%): documents drawn by hypothesis strategies (`@given`, `@seed`, no database, generate
  phase only): plausible traces, generations and sessions built from whitelisted ops, hook points and
  clean arguments, and hostile ones built from hostile op names, module paths, index values, strings,
  tensors whose dtype, shape and bytes disagree, raw and unknown extension types, nested at random;
- varied (32%):     seeded structural variants of each hypothesis document (parts swapped for hostile
  values, dropped, duplicated): hypothesis draws cost ~10 ms each, these ~0.1 ms;
- mutated (40%):    byte-level mutations (bit flips, interesting bytes and integers, inserts, deletes,
  duplications, splices, truncations, changed extension codes) of runnable seed documents and of the
  generated documents that validated;
- random (20%):     raw random bytes, half of them built from msgpack header bytes.

Every payload goes through `codec.decode` + `validate` in-process (as the server runs them); every
`stride`-th one (at least `--grpc` of them) and every one that validates is also sent over gRPC as an
Execute call: mostly with a valid header and random chunking (1-byte chunks included), sometimes with a
hostile header (announcing more or fewer bytes than sent, or too many; unknown model; wrong IR
version; no header; two headers; nothing at all). Every `--check-every` calls (every call in the smoke
test) a liveness check runs: the replica's worker healthy, the health service SERVING, and a known
request returning exactly the values it returned before fuzzing (which match a plain PyTorch-hooks
reference).

A *crash* is any of:

- anything but a `FarscopeError` escaping `codec.decode` + `validate` in-process;
- a gRPC status outside {OK, INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, NOT_FOUND,
  ABORTED} (so INTERNAL, UNKNOWN, UNAVAILABLE: the server died or broke, DEADLINE_EXCEEDED: a hang);
- the server answering differently from what the in-process verdict (or the hostile header) implies,
  in particular OK for a document that validation rejects;
- an error without the `farscope-error` trailer naming a class that maps to the status sent, or with
  an empty message or one over 8 KiB (gRPC's soft metadata limit: such errors get lost on the way);
- a failed liveness check (worker, health or known values).

Prints payload counts, the status code histogram, crashes and elapsed time; exits 1 if there was any
crash. Crashing payloads are written to `--crash-dir`. Importable: `run()` is what the smoke test calls.

Values a request can turn into allocation sizes are drawn small (-3..12) or enormous (>= 2**40, which
fail at once), and this process's address space (the server's too: it runs here) is capped while
fuzzing (`--memory-headroom-gb`), so that a request that gets past the server's allocation guard fails
to allocate (an ABORTED call) instead of taking the machine's memory. The peak RSS is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import msgpack
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from farscope.interventions import codec, ops
from farscope.interventions.errors import ERROR_CLASSES, STATUS_OF, FarscopeError
from farscope.interventions.graph import IR_VERSION, HookPoint, Ref
from farscope.interventions.uploads import UploadStore
from farscope.interventions.validate import GENERATION_OPTIONS, GraphLimits, validate
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc

__all__ = [
    "ALLOWED_CODES", "MODEL", "PROMPT", "SENTINEL_MODULE", "Outcome", "Report", "build_tiny_model", "call_execute",
    "document_strategy", "fuzz_limits", "messages_for", "mutate", "random_bytes", "reference_values", "run",
    "seed_documents", "sentinel_document", "sentinel_values", "status_of", "vary",
]

MODEL = "tiny"
PROMPT = "The quick brown fox jumps over the lazy dog."
SENTINEL_MODULE = "model.layers.0.mlp"
ALLOWED_CODES = frozenset({"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "NOT_FOUND",
                           "ABORTED"})
MAX_DETAILS = 8192  # gRPC's soft limit on metadata: a longer message may not reach the client at all
MAX_PAYLOAD = 256 * 1024
HERE = Path(__file__).resolve().parent


# -- the server under test ---------------------------------------------------------------------------------


def fuzz_limits() -> Any:
    """Limits of the fuzzed model: roomy for every generated payload, tight on memory and time."""
    from farscope.server.config import Limits

    return Limits(max_request_bytes=4 * MAX_PAYLOAD, max_nodes=256, max_saved_bytes=64 << 20,
                  max_wall_seconds=20)


def build_tiny_model(directory: Path) -> Path:
    """Save the tests' tiny random Llama (tests/conftest.py builds it the same way) into `directory`."""
    if (directory / "config.json").exists():
        return directory
    spec = importlib.util.spec_from_file_location("_farscope_tests_conftest", HERE.parent / "conftest.py")
    assert spec is not None and spec.loader is not None
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    from transformers import AutoModelForCausalLM

    tokenizer_dir = directory / "tokenizer"
    vocab_size = conftest._build_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conftest._tiny_config("llama", vocab_size))
    model.save_pretrained(directory)
    for file in tokenizer_dir.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


def sentinel_document() -> bytes:
    """A known request: the first MLP's output and the logits for PROMPT."""
    return codec.encode({"version": IR_VERSION, "invokes": [PROMPT], "nodes": [
        ["read", (HookPoint(SENTINEL_MODULE, "output"),), {"invoke": 0}, "sentinel:1"],
        ["save", (Ref(0),), {}, "sentinel:1"],
        ["read", (HookPoint("lm_head", "output"),), {"invoke": 0}, "sentinel:2"],
        ["save", (Ref(2),), {}, "sentinel:2"],
    ]})


def sentinel_values(values: dict[int, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return values[1], values[3]


def reference_values(model: torch.nn.Module, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """What the sentinel request must return, computed with plain PyTorch hooks on a local copy."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(path).register_forward_hook(
        lambda module, args, output, path=path: seen.__setitem__(path, output.detach().clone()))
        for path in (SENTINEL_MODULE, "lm_head")]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([tokenizer(PROMPT)["input_ids"]]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen[SENTINEL_MODULE], seen["lm_head"]


# -- one Execute call ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: str  # "OK" or a grpc.StatusCode name
    details: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    values: Any = None


def status_of(error_class: str) -> str | None:
    """The status name the server sends for a farscope error class (None for an unknown name)."""
    cls = ERROR_CLASSES.get(error_class)
    if cls is None:
        return None
    return next(STATUS_OF[c] for c in cls.__mro__ if c in STATUS_OF)


def messages_for(document: bytes, *, model: str = MODEL, ir_version: int = IR_VERSION,
                 announced: int | None = None, chunk_sizes: list[int] | None = None) -> list[pb.ExecuteRequest]:
    """A header (announcing len(document) unless told otherwise) and the document in chunks."""
    header = pb.ExecuteRequest(header=pb.RequestHeader(
        model=model, client_version="fuzz", ir_version=ir_version,
        graph_bytes=len(document) if announced is None else announced))
    chunks, offset = [], 0
    for size in chunk_sizes or [max(len(document), 1)]:
        if offset >= len(document):
            break
        chunks.append(pb.ExecuteRequest(graph_chunk=document[offset:offset + size]))
        offset += size
    if offset < len(document):
        chunks.append(pb.ExecuteRequest(graph_chunk=document[offset:]))
    return [header, *chunks]


def call_execute(stub: pb_grpc.FarscopeStub, messages: list[pb.ExecuteRequest], *, timeout: float = 60,
                 metadata: tuple[tuple[str, str], ...] = ()) -> Outcome:
    """Run one Execute call to its end: the status, and on OK the saved values. `metadata`: e.g. an
    API key, as `(("authorization", "Bearer <key>"),)`."""
    blobs: list[bytearray] = []
    done = False
    try:
        for event in stub.Execute(iter(messages), timeout=timeout, metadata=metadata):
            kind = event.WhichOneof("event")
            if kind == "result":
                blobs = [bytearray(size) for size in event.result.blob_sizes]
            elif kind == "chunk":
                chunk = event.chunk
                blobs[chunk.blob][chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
            elif kind == "done":
                done = True
    except grpc.RpcError as e:
        return Outcome(e.code().name, e.details() or "", dict(e.trailing_metadata() or ()))
    if not done or not blobs:
        return Outcome("INCOMPLETE", "the stream ended without a done event")
    return Outcome("OK", values=codec.decode_results(bytes(blobs[0]), blobs[1:]))


# -- generators ---------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
# Sizes: small, or so large that any allocation from them fails at once (never a few GiB that succeed).
HUGE_INTS = [2**40, 10**12, 2**62, 2**63 - 1, 2**64 - 1, -(2**63), -(2**40)]
SPECIAL_FLOATS = [NAN, INF, -INF, 0.0, -0.0, 0.5, -1.0, 1e308, 5e-324, 12.0]
TRICKY_STRINGS = [
    "", "\x00", "shape", "logits", "T", "__class__", "__globals__", "__dict__", "__reduce__", "_modules",
    "m\u043edel", "model.\u200blayers.0", "\u202emodel", "\uff4dodel", "model\x00", "..", "../../etc/passwd",
    "__import__('os').system('true')", "eval", "exec", "%s%n%x", "{0.__class__}", "\ud7ff\ue000\U0010ffff",
    "e\u0301", "\ufeffoutput", "output ", "invoke", "call",
]
HOSTILE_OPS = [
    "eval", "exec", "__import__", "open", "compile", "globals", "vars", "setattr", "os.system", "builtins.eval",
    "subprocess.Popen", "torch.load", "torch.save", "torch.hub.load", "torch.from_file", "Tensor.__reduce_ex__",
    "Tensor.numpy", "Tensor.data_ptr", "Tensor.storage", "Tensor.", "", "add\x00", "\uff41dd", "Add", "add ",
    "torch.nn.functional.__dict__", "torch.ops.aten.empty", "getattr.__globals__",
]
HOSTILE_PATHS = ["__class__", "__globals__", "model.__dict__", "model.layers.0.__class__", "..", "model..layers",
                 ".", "model.layers.-1", "model.layers.00", "/etc/passwd", "../../etc/passwd", "m\u043edel",
                 "model.\u200blayers.0", "\u202emodel", "model\x00", "model.layers.0 ", "\uff4dodel"]
POINTS = ["output", "output", "output", "input", "inputs", "result", "forward", "grad", "__class__", "output\x00", ""]
INDEX_LIKE = [0, 0, 0, 0, 1, None, -1, 2, True, False, 1.0, NAN, INF, -INF, "0", 2**63 - 1, -(2**63), 2**64 - 1]
KWARG_NAMES = ["invoke", "call", "optional", "dim", "keepdim", "dtype", "retain_graph", "size", "k", "_x",
               "__class__", "self", "invoke\u200b", "1", ""]
SAFE_INT_DTYPES = {"int64", "int32", "int16"}  # their values become sizes: keep them small


def _tensor(dtype_name: str, shape: list[int], fill: bytes) -> torch.Tensor:
    dtype = codec.DTYPES[dtype_name]
    numel = math.prod(shape)
    size = numel * torch.empty((), dtype=dtype).element_size()
    data = (fill * (size // max(len(fill), 1) + 1))[:size] if fill else bytes(size)
    tensor = codec.tensor_from_bytes(dtype_name, shape, data)
    if dtype_name in SAFE_INT_DTYPES:
        tensor = tensor.remainder(16) - 3
    return tensor


def _raw_ext(code: int, payload: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True))


def _ordered(nodes: list[list[Any]]) -> list[list[Any]]:
    """Point every reference at an earlier node (so that more plausible documents get past validation)."""
    def fix(value: Any, index: int) -> Any:
        if isinstance(value, Ref):
            return Ref(value.id % index) if index else value
        if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
            return type(value)(fix(v, index) for v in value)
        if isinstance(value, dict):
            return {k: fix(v, index) for k, v in value.items()}
        return value
    return [[op, fix(args, i), fix(kwargs, i), where] for i, (op, args, kwargs, where) in enumerate(nodes)]


def _with_block(nodes: list[list[Any]], condition: Any, then: list[Ref], otherwise: list[Ref] | None,
                where: int) -> list[list[Any]]:
    """`nodes` with a conditional block (and maybe its else) inserted at `where`: its body saves the
    values `then` / `otherwise` name (pointed at earlier nodes), its condition may be hostile."""
    at = where % (len(nodes) + 1)
    head, tail = nodes[:at], nodes[at:]
    opener = len(head)
    block = [["if", (condition,), {}, "fuzz.py:5"]]
    block += [["save", (Ref(r.id % opener) if opener else r,), {}, "fuzz.py:5"] for r in then]
    block.append(["end", (Ref(opener),), {}, "fuzz.py:5"])
    if otherwise is not None:
        block.append(["else", (Ref(opener),), {}, "fuzz.py:5"])
        block += [["save", (Ref(r.id % opener) if opener else r,), {}, "fuzz.py:5"] for r in otherwise]
        block.append(["end", (Ref(opener + len(then) + 2),), {}, "fuzz.py:5"])
    shift = len(block)  # the tail's references to its own nodes move past the block
    moved = [[op, _shifted(args, at, shift), _shifted(kwargs, at, shift), w] for op, args, kwargs, w in tail]
    return head + block + moved


def _shifted(value: Any, at: int, shift: int) -> Any:
    if isinstance(value, Ref):
        return Ref(value.id + shift) if value.id >= at else value
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(_shifted(v, at, shift) for v in value)
    if isinstance(value, dict):
        return {k: _shifted(v, at, shift) for k, v in value.items()}
    return value


def _nested_blocks(depth: int, condition: Any) -> list[list[Any]]:
    """`depth` conditional blocks inside one another around one read (the limit is 32 deep)."""
    nodes = [["read", (HookPoint("lm_head", "output"),), {"invoke": 0}, ""]]
    nodes += [["if", (condition,), {}, ""] for _ in range(depth)]
    nodes.append(["save", (Ref(0),), {}, ""])
    nodes += [["end", (Ref(depth - i),), {}, ""] for i in range(depth)]
    return nodes


def document_strategy(paths: list[str]) -> st.SearchStrategy[Any]:
    """Request documents: plausible ones (which mostly validate, and run) and thoroughly hostile ones."""
    small = st.integers(-3, 12)
    ints = st.one_of(small, small, small, st.sampled_from(HUGE_INTS))
    floats = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(-8, 8))
    strings = st.one_of(st.text(max_size=8), st.sampled_from(TRICKY_STRINGS))
    modules = st.one_of(st.sampled_from(paths), st.sampled_from(paths), st.sampled_from(HOSTILE_PATHS))
    hooks = st.builds(HookPoint, modules, st.sampled_from(POINTS))
    refs = st.builds(Ref, st.integers(0, 10))
    dtype_names = st.sampled_from(sorted(codec.DTYPES))
    dtypes = st.sampled_from(list(codec.DTYPES.values()))
    tensors = st.builds(_tensor, dtype_names, st.lists(st.integers(0, 4), max_size=3), st.binary(max_size=16))
    sizes = st.lists(st.one_of(st.integers(0, 6), st.sampled_from([2**40, 2**63 - 1])), max_size=3).map(torch.Size)
    wire_junk = st.one_of(
        st.none(), ints, floats, strings, st.binary(max_size=8),
        st.lists(st.one_of(ints, floats, strings, st.none()), max_size=3))
    raw_exts = st.one_of(
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
        st.builds(_raw_ext, st.integers(1, 13), wire_junk),
        # tensors whose dtype, shape and bytes need not agree
        st.builds(lambda d, s, b: _raw_ext(2, [d, s, b]), st.one_of(dtype_names, strings, ints),
                  st.one_of(st.lists(ints, max_size=4), wire_junk), st.binary(max_size=32)),
    )
    leaves = st.one_of(
        st.none(), st.booleans(), ints, ints, floats, strings, st.just(Ellipsis), dtypes,
        refs, refs, refs, hooks, tensors, sizes, st.binary(max_size=8), raw_exts,
    )
    values = st.recursive(leaves, lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(strings, kids, max_size=2),
        st.builds(slice, st.none() | kids, st.none() | kids, st.none() | kids),
    ), max_leaves=8)
    # What a real client sends: references, small numbers, slices, dtypes, small tensors.
    clean_leaves = st.one_of(refs, refs, refs, small, small, st.floats(-4, 4, allow_nan=False), st.none(),
                             st.booleans(), st.just(Ellipsis), dtypes, tensors, st.sampled_from(["shape", "logits"]))
    clean_values = st.recursive(clean_leaves, lambda kids: st.one_of(
        st.lists(kids, max_size=3).map(tuple), st.lists(kids, max_size=3),
        st.builds(slice, st.none() | small, st.none() | small, st.none() | st.integers(1, 3)),
    ), max_leaves=4)

    index_like = st.sampled_from(INDEX_LIKE)
    wheres = st.one_of(st.just(""), st.just("fuzz.py:1"), st.text(max_size=6))
    hook_kwargs = st.one_of(
        st.fixed_dictionaries({"invoke": index_like}),
        st.fixed_dictionaries({"invoke": index_like}, optional={"call": index_like, "optional": index_like}),
        st.dictionaries(st.sampled_from(KWARG_NAMES), index_like, max_size=3),
    )
    hook_nodes = st.builds(
        lambda op, hook, value, kwargs, where: [op, (hook,) if op == "read" else (hook, value), kwargs, where],
        st.sampled_from(["read", "read", "read", "write", "skip", "call_module"]),
        st.builds(HookPoint, modules, st.sampled_from(POINTS)), values, hook_kwargs, wheres)
    op_names = st.one_of(st.sampled_from(sorted(ops.REGISTRY)), st.sampled_from(sorted(ops.REGISTRY)),
                         st.sampled_from(HOSTILE_OPS))
    op_nodes = st.builds(
        lambda op, first, rest, kwargs, where: [op, (first, *rest), kwargs, where],
        op_names, st.one_of(refs, refs, values), st.lists(values, max_size=3),
        st.dictionaries(st.sampled_from(KWARG_NAMES), values, max_size=2), wheres)
    wild_nodes = st.one_of(
        st.lists(values, max_size=5),
        st.builds(lambda op, args, kwargs, where: [op, args, kwargs, where], st.one_of(op_names, values),
                  values, values, st.one_of(wheres, values)),
    )
    nodes = st.lists(st.one_of(hook_nodes, hook_nodes, op_nodes, op_nodes, op_nodes, wild_nodes), max_size=8)
    many_nodes = st.integers(250, 262).map(
        lambda n: [["read", (HookPoint(paths[-1], "output"),), {"invoke": 0}, ""]]
        + [["save", (Ref(0),), {}, ""]] * (n - 1))

    plausible_reads = st.builds(
        lambda path, point, invoke: ["read", (HookPoint(path, point),), {"invoke": invoke}, "fuzz.py:1"],
        st.sampled_from(paths), st.sampled_from(["output", "output", "input", "inputs"]), st.sampled_from([0, 0, None]))
    plausible_ops = st.builds(
        lambda op, first, rest, kwargs: [op, (first, *rest), kwargs, "fuzz.py:2"],
        st.sampled_from(sorted(ops.REGISTRY)), refs, st.lists(clean_values, max_size=2),
        st.dictionaries(st.sampled_from(["dim", "keepdim", "dtype", "k"]), clean_values, max_size=1))
    plausible_writes = st.builds(
        lambda op, path, value: [op, (HookPoint(path, "output"), value), {"invoke": 0}, "fuzz.py:3"],
        st.sampled_from(["write", "write", "skip"]), st.sampled_from(paths), st.one_of(refs, clean_values))
    saves = st.builds(lambda ref: ["save", (ref,), {}, "fuzz.py:4"], refs)
    plausible_nodes = st.builds(
        lambda first, rest: _ordered([first, *rest]), plausible_reads,
        st.lists(st.one_of(plausible_reads, plausible_ops, plausible_ops, plausible_ops, plausible_writes, saves,
                           saves), max_size=7))

    versions = st.one_of(st.just(IR_VERSION), st.just(IR_VERSION), st.just(IR_VERSION), st.just(IR_VERSION),
                         st.sampled_from([0, 2, -1, 1.0, True, "1", None, NAN, 2**64 - 1, [1]]))
    texts = st.one_of(st.sampled_from(["hello world", PROMPT, "a"]), st.text(max_size=12))
    token_ids = st.lists(st.integers(-2, 600), max_size=6)
    invoke_inputs = st.one_of(
        texts, texts, texts, token_ids, st.lists(st.lists(st.integers(0, 500), min_size=1, max_size=4), max_size=2),
        st.lists(texts, min_size=1, max_size=2),
        st.builds(lambda ids: torch.tensor(ids, dtype=torch.int64), st.lists(st.integers(-1, 520), min_size=1,
                                                                               max_size=5)),
        values)
    invokes = st.one_of(st.lists(invoke_inputs, min_size=1, max_size=3), st.lists(invoke_inputs, max_size=3),
                        values)
    plausible_invokes = st.lists(st.one_of(st.sampled_from(["hello world", PROMPT, "a"]),
                                           st.lists(st.integers(0, 500), min_size=1, max_size=5)),
                                 min_size=1, max_size=2)
    modes = st.sampled_from(["trace", "trace", "generate", "eval", "", None, 1])
    options = st.dictionaries(
        st.sampled_from([*GENERATION_OPTIONS, "num_beams", "streamer", "__class__"]),
        st.one_of(st.integers(-1, 3), st.sampled_from([4097, 2**63 - 1, NAN, INF, True, 0.7, "3", None])),
        max_size=3)
    # Conditional blocks: well nested around plausible nodes (conditions true, false, tensors, hostile
    # values), and nested around the depth limit.
    conditions = st.one_of(refs, st.booleans(), small, floats, values)
    blocked_nodes = st.builds(_with_block, plausible_nodes, conditions, st.lists(refs, max_size=2),
                              st.one_of(st.none(), st.lists(refs, max_size=2)), st.integers(0, 8))
    deep_nodes = st.builds(_nested_blocks, st.integers(30, 34), st.one_of(st.booleans(), st.just(1)))
    plausible_docs = st.one_of(
        st.fixed_dictionaries({"version": st.just(IR_VERSION), "invokes": plausible_invokes,
                               "nodes": plausible_nodes}),
        st.fixed_dictionaries({"version": st.just(IR_VERSION), "invokes": plausible_invokes,
                               "nodes": st.one_of(blocked_nodes, blocked_nodes, deep_nodes)}),
        st.fixed_dictionaries({"version": st.just(IR_VERSION), "invokes": plausible_invokes,
                               "nodes": plausible_nodes, "mode": st.just("generate"),
                               "options": st.fixed_dictionaries({"max_new_tokens": st.integers(1, 3)})}))
    segment_fields = {"invokes": invokes, "nodes": st.one_of(nodes, nodes, nodes, nodes, nodes, many_nodes, values)}
    optional_fields = {"mode": modes, "options": options}
    traces = st.fixed_dictionaries(segment_fields, optional=optional_fields)
    trace_docs = st.fixed_dictionaries({"version": versions, **segment_fields}, optional=optional_fields)
    session_docs = st.fixed_dictionaries({"version": versions, "traces": st.one_of(
        st.lists(st.one_of(traces, plausible_docs.map(lambda d: {k: v for k, v in d.items() if k != "version"})),
                 max_size=3), values)})
    junk_keys = st.builds(lambda doc, extra: {**doc, **extra}, trace_docs,
                          st.dictionaries(st.one_of(strings, st.sampled_from(["traces", "version"])), values,
                                          min_size=1, max_size=2))
    return st.one_of(plausible_docs, plausible_docs, plausible_docs, plausible_docs, trace_docs, trace_docs,
                     trace_docs, session_docs, junk_keys, values)


def seed_documents(paths: frozenset[str]) -> list[bytes]:
    """Valid requests of every kind the server runs, to mutate."""
    layer = "model.layers.0" if "model.layers.0" in paths else sorted(paths)[-1]
    mlp, head = HookPoint(SENTINEL_MODULE, "output"), HookPoint("lm_head", "output")

    def doc(*nodes: list[Any], invokes: Any = (PROMPT,), **extra: Any) -> dict[str, Any]:
        return {"version": IR_VERSION, "invokes": list(invokes), "nodes": list(nodes), **extra}

    def read(hook: HookPoint, invoke: int | None = 0, **kw: Any) -> list[Any]:
        return ["read", (hook,), {"invoke": invoke, **kw}, "seed.py:1"]

    def node(op: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [op, args, kwargs, "seed.py:2"]

    documents = [
        doc(read(mlp), node("save", Ref(0)), read(head), node("save", Ref(2))),
        doc(read(mlp), node("setitem", Ref(0), (slice(None), -1), 0.0), node("save", Ref(0)), read(head),
            node("save", Ref(3))),
        doc(node("write", mlp, torch.zeros(64), invoke=0), read(head), node("Tensor.sum", Ref(1), dim=-1),
            node("save", Ref(2))),
        doc(read(mlp), node("getitem", Ref(0), (slice(None), -1)), node("iadd", Ref(1), torch.ones(64)),
            read(head), node("getattr", Ref(3), "shape"), node("save", Ref(4))),
        doc(read(HookPoint("", "output")), node("field", Ref(0), "logits"),
            node("getitem", Ref(1), (Ellipsis, slice(0, 5, 2))), node("Tensor.to", Ref(2), torch.float16),
            node("save", Ref(3))),
        doc(read(mlp), node("Tensor.view", Ref(0), torch.Size([19, 64])), node("torch.topk", Ref(1), 3),
            node("field", Ref(2), "indices"), node("save", Ref(3))),
        doc(read(mlp), read(head), node("Tensor.sum", Ref(1)), node("grad", Ref(0)), node("save", Ref(3)),
            node("backward", Ref(2))),
        doc(read(mlp, invoke=None), node("log", "mlp", Ref(0)), node("stop"), invokes=["hello world", [[5, 6, 7]]]),
        doc(read(mlp, invoke=1), node("save", Ref(0)), read(head, invoke=0), node("save", Ref(2)),
            invokes=[PROMPT, torch.tensor([5, 6, 7, 8])]),
        doc(read(HookPoint("", "result")), node("save", Ref(0)), mode="generate", options={"max_new_tokens": 2}),
        {"version": IR_VERSION, "traces": [
            {"invokes": [PROMPT], "nodes": [read(mlp), node("save", Ref(0))]},
            {"invokes": [PROMPT], "nodes": [node("write", mlp, Ref(0), invoke=0), read(head), node("save", Ref(3))]},
        ]},
        doc(read(HookPoint(layer, "inputs")), node("save", Ref(0)), node("torch.zeros", 3),
            node("torch.cat", [Ref(2), torch.arange(3.0)]), node("save", Ref(3))),
        doc(read(HookPoint(f"{layer}.post_attention_layernorm", "output")), node("skip", mlp, Ref(0), invoke=0),
            read(head),
            node("save", Ref(2))),
        doc(read(HookPoint(SENTINEL_MODULE, "input")),
            node("call_module", HookPoint(SENTINEL_MODULE, "forward"), Ref(0)), node("save", Ref(1))),
        # conditional blocks: a branch taken and one not (whose read waits for no module), nested
        doc(read(mlp), node("Tensor.sum", Ref(0)), node("gt", Ref(1), -1e30), node("if", Ref(2)),
            node("setitem", Ref(0), (slice(None), -1), 0.0), node("end", Ref(3)), node("else", Ref(3)),
            read(head), node("save", Ref(7)), node("end", Ref(6)), node("save", Ref(0))),
        doc(read(mlp), node("if", True), node("Tensor.norm", Ref(0)), node("if", Ref(2)), node("save", Ref(2)),
            node("end", Ref(3)), node("end", Ref(1)), node("if", False), read(head), node("save", Ref(8)),
            node("end", Ref(7))),
    ]
    return [codec.encode(d) for d in documents]


_VARIANT_POOL: list[Any] = [
    *INDEX_LIKE, *HUGE_INTS, *SPECIAL_FLOATS, *TRICKY_STRINGS, *HOSTILE_OPS[:8], Ellipsis, b"\x80\x04", (), [], {},
    [[[[[]]]]], torch.float32, torch.Size([2**40]), torch.zeros(2), torch.ones((), dtype=torch.bool), Ref(0), Ref(1),
    Ref(2**63 - 1), HookPoint("model.layers.0", "output"), HookPoint("", "result"), HookPoint("..", "output"),
    slice(NAN, INF, 0), msgpack.ExtType(99, b"\x00"), msgpack.ExtType(2, b"\x93\xa7float32\x91\x01\xc4\x00"),
    {"invoke": 0}, {"__class__": 1}, ["read", (), {}, ""], {"version": 1, "invokes": [], "nodes": []},
]


def vary(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """`value` (a structured document) with random parts swapped, dropped or added: cheap and seeded."""
    if rng.random() < 0.02 or depth > 40:
        return rng.choice(_VARIANT_POOL)
    if isinstance(value, dict):
        out = {(rng.choice(KWARG_NAMES + ["version", "nodes", "traces", "mode"]) if rng.random() < 0.05 else k):
               vary(rng, v, depth + 1) for k, v in value.items()}
        if rng.random() < 0.05:
            out[rng.choice(KWARG_NAMES)] = rng.choice(_VARIANT_POOL)
        return out
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        items = [vary(rng, v, depth + 1) for v in value]
        if items and rng.random() < 0.05:
            del items[rng.randrange(len(items))]
        if rng.random() < 0.05:
            items.insert(rng.randrange(len(items) + 1), rng.choice(_VARIANT_POOL))
        if items and rng.random() < 0.03:
            items.append(items[rng.randrange(len(items))])
        return tuple(items) if isinstance(value, tuple) and rng.random() < 0.97 else items
    return value


# -- byte-level mutation -----------------------------------------------------------------------------------

INTERESTING_BYTES = bytes([0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4,
                           0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD3, 0xD4,
                           0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF])
INTERESTING_INTS = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                    0x7FFFFFFFFFFFFFFF, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4, 8))):
        n = len(out)
        kind = rng.randrange(11)
        if n == 0:
            out += rng.randbytes(rng.randrange(1, 8))
        elif kind == 0:  # flip one bit
            out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[rng.randrange(n)] = rng.randrange(256)
        elif kind == 2:
            out[rng.randrange(n)] = rng.choice(INTERESTING_BYTES)
        elif kind == 3:  # an interesting integer over 1, 2, 4 or 8 bytes
            width = rng.choice((1, 2, 4, 8))
            at = rng.randrange(n)
            value = rng.choice(INTERESTING_INTS) & ((1 << (8 * width)) - 1)
            out[at:at + width] = value.to_bytes(width, rng.choice(("big", "little")))
        elif kind == 4:
            at = rng.randrange(n + 1)
            out[at:at] = rng.randbytes(rng.randrange(1, 9))
        elif kind == 5:
            at = rng.randrange(n)
            del out[at:at + rng.randrange(1, 17)]
        elif kind == 6:  # duplicate a slice
            at, length = rng.randrange(n), rng.randrange(1, 33)
            out[at:at] = out[at:at + length]
        elif kind == 7:
            del out[rng.randrange(n):]
        elif kind == 8:  # splice with another document
            other = rng.choice(pool)
            out = out[:rng.randrange(n + 1)] + other[rng.randrange(len(other) + 1):]
        elif kind == 9:
            out += rng.choice((b"\x00", b"\xc1", b"\xc0", rng.randbytes(rng.randrange(1, 9))))
        else:  # change an extension type code (fixext/ext headers are followed by the type byte)
            spots = [i for i, b in enumerate(out[:-2]) if b in (0xC7, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8)]
            if spots:
                at = rng.choice(spots) + (2 if out[spots[0]] == 0xC7 else 1)
                out[min(at, len(out) - 1)] = rng.randrange(256)
        if len(out) > MAX_PAYLOAD:
            del out[MAX_PAYLOAD:]
    return bytes(out)


def random_bytes(rng: random.Random) -> bytes:
    size = rng.choice((rng.randrange(0, 16), rng.randrange(0, 64), rng.randrange(0, 64), rng.randrange(0, 4096)))
    if rng.random() < 0.5:
        return rng.randbytes(size)
    # msgpack-looking: random headers and bytes
    return bytes(rng.choice(INTERESTING_BYTES) if rng.random() < 0.4 else rng.randrange(256) for _ in range(size))


# -- the run -------------------------------------------------------------------------------------------------


@dataclass
class Crash:
    kind: str
    family: str
    detail: str
    payload: bytes


@dataclass
class Report:
    seed: int
    count: int
    families: Counter = field(default_factory=Counter)
    verdicts: Counter = field(default_factory=Counter)  # in-process: "accepted" or the error class
    codes: Counter = field(default_factory=Counter)  # over gRPC
    header_variants: Counter = field(default_factory=Counter)
    checks: int = 0
    crashes: list[Crash] = field(default_factory=list)
    elapsed: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    seeds_ok: int = 0
    seeds: int = 0

    @property
    def sent(self) -> int:
        return sum(self.families.values())

    @property
    def grpc_sent(self) -> int:
        return sum(self.codes.values())

    def format(self, *, max_crashes: int = 20) -> str:
        def hist(counter: Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in counter.most_common())
        lines = [
            f"farscope request fuzzer: seed {self.seed}, count {self.count}",
            f"payloads: {self.sent} ({hist(self.families)})",
            f"in-process decode+validate: {hist(self.verdicts)}",
            f"over gRPC: {self.grpc_sent} Execute calls ({hist(self.header_variants)})",
            f"status codes: {hist(self.codes)}",
            f"seed documents run OK: {self.seeds_ok}/{self.seeds}; health + known-values checks passed: "
            f"{self.checks}",
            f"crashes: {len(self.crashes)}" + (f" ({hist(Counter(c.kind for c in self.crashes))})"
                                               if self.crashes else ""),
        ]
        for crash in self.crashes[:max_crashes]:
            lines.append(f"  [{crash.kind}] {crash.family}: {crash.detail[:300]!r} payload={crash.payload[:48]!r}")
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phase_seconds.items())
        lines.append(f"elapsed: {self.elapsed:.1f} s ({phases}); peak RSS {self.peak_rss_mb:.0f} MiB")
        return "\n".join(lines)


class _Fuzzer:
    def __init__(self, replica: Any, stub: pb_grpc.FarscopeStub, health: health_pb2_grpc.HealthStub,
                 baseline: tuple[torch.Tensor, torch.Tensor], report: Report, *, rng: random.Random, stride: int,
                 check_every: int, timeout: float, log: Callable[[str], None], scheduler: Any = None) -> None:
        self.replica, self.stub, self.health, self.baseline = replica, stub, health, baseline
        self.scheduler = scheduler  # the replica's, when the server runs in this process: its worker is checked
        self.report, self.rng, self.stride, self.check_every, self.timeout = report, rng, stride, check_every, timeout
        self.log = log
        self.paths = replica.module_paths
        self.limits = GraphLimits(max_nodes=replica.limits.max_nodes)
        self.uploads = UploadStore(64 << 20)
        self.index = 0
        self.accepted: list[bytes] = []  # structured documents that validated: more seeds to mutate

    def crash(self, kind: str, family: str, detail: str, payload: bytes) -> None:
        self.report.crashes.append(Crash(kind, family, detail, payload))
        self.log(f"CRASH [{kind}] {family}: {detail[:300]}")

    def local_verdict(self, family: str, data: bytes) -> str:
        try:
            validate(codec.decode(data, uploads=self.uploads), module_paths=self.paths, limits=self.limits)
        except FarscopeError as e:
            return type(e).__name__
        except BaseException as e:  # noqa: BLE001 - the point: nothing else may escape
            if isinstance(e, KeyboardInterrupt):
                raise
            self.crash("in-process exception", family, f"{type(e).__name__}: {e}", data)
            return "CRASH"
        return "accepted"

    def feed(self, family: str, data: bytes) -> None:
        self.report.families[family] += 1
        verdict = self.local_verdict(family, data)
        self.report.verdicts[verdict] += 1
        if verdict == "accepted" and family in ("structured", "varied") and len(self.accepted) < 2000:
            self.accepted.append(data)
        self.index += 1
        if self.index % self.stride == 0 or verdict == "accepted":  # every document that validates runs
            self.over_grpc(family, data, verdict)

    def over_grpc(self, family: str, data: bytes, verdict: str) -> None:
        rng = self.rng
        variant, expected = "valid header", None
        chunk_sizes = None
        roll = rng.random()
        if roll < 0.3 and len(data) > 1:
            chunk_sizes = [rng.randrange(1, len(data) + 1) for _ in range(rng.randrange(1, 5))]
        elif roll < 0.35 and 1 < len(data) <= 64:
            chunk_sizes = [1] * len(data)
        messages = messages_for(data, chunk_sizes=chunk_sizes)
        if rng.random() < 0.15:
            variant, expected, messages = self.hostile_header(data, messages)
        self.report.header_variants[variant] += 1
        outcome = call_execute(self.stub, messages, timeout=self.timeout)
        self.report.codes[outcome.code] += 1
        self.judge(family, data, verdict, variant, expected, outcome)
        if self.report.grpc_sent % self.check_every == 0:
            self.check(f"after {self.report.grpc_sent} calls")

    def hostile_header(self, data: bytes, messages: list[pb.ExecuteRequest]) -> tuple[str, str, list[Any]]:
        rng = self.rng
        header, chunks = messages[0], messages[1:]
        kind = rng.randrange(8)
        if kind == 0:
            header.header.graph_bytes = len(data) + rng.choice((1, 2, 1000))
            return "announces more", "INVALID_ARGUMENT", messages
        if kind == 1 and len(data) > 0:
            header.header.graph_bytes = len(data) - 1
            return "announces less", "INVALID_ARGUMENT", messages
        if kind == 2:
            header.header.graph_bytes = rng.choice((2**64 - 1, 2**63, self.replica.limits.max_request_bytes + 1))
            return "announces too much", "RESOURCE_EXHAUSTED", messages
        if kind == 3:
            header.header.model = rng.choice(["", "tiny\x00", "t\u0456ny", "\u202etiny", "../tiny", "TINY",
                                              "tiny ", "x" * rng.randrange(1, 300)])
            return "unknown model", "NOT_FOUND", messages
        if kind == 4:
            header.header.ir_version = rng.choice((0, IR_VERSION + 1, 2**32 - 1))
            return "wrong IR version", "FAILED_PRECONDITION", messages
        if kind == 5:
            return "no header", "INVALID_ARGUMENT", chunks or [pb.ExecuteRequest(graph_chunk=b"\x80")]
        if kind == 6:
            return "two headers", "INVALID_ARGUMENT", [header, header, *chunks]
        return "empty call", "INVALID_ARGUMENT", []

    def judge(self, family: str, data: bytes, verdict: str, variant: str, expected: str | None,
              outcome: Outcome) -> None:
        code = outcome.code
        if code not in ALLOWED_CODES:
            self.crash(f"status {code}", family, f"{variant}, in-process {verdict}: {outcome.details}", data)
            return
        if code != "OK":
            name = outcome.metadata.get("farscope-error")
            if name is None or status_of(name) != code:
                self.crash("unlabelled error", family, f"{code} with farscope-error={name!r}: {outcome.details}", data)
            if not outcome.details or len(outcome.details.encode()) > MAX_DETAILS:
                self.crash("bad error message", family, f"{code}: {len(outcome.details)} characters", data)
        if expected is not None:
            if code != expected:
                self.crash("header not honoured", family, f"{variant}: expected {expected}, got {code}: "
                                                          f"{outcome.details}", data)
            return
        if verdict == "accepted":
            return  # the graph ran: OK, or an error while it ran (ABORTED, a limit, bad token ids, ...)
        want = status_of(verdict)
        if code != want:
            kind = "validation bypass" if code == "OK" else "server disagrees with validate"
            self.crash(kind, family, f"in-process {verdict} ({want}), server {code}: {outcome.details}", data)

    def check(self, when: str) -> None:
        """Liveness after fuzzing: the worker healthy, health SERVING, the known request's exact values."""
        if self.scheduler is not None and not (self.scheduler.healthy and self.scheduler.alive):
            self.crash("worker", "check", f"{when}: the replica's worker is not healthy", b"")
            return
        for service in ("", "farscope.v1.Farscope"):
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
            except grpc.RpcError as e:
                self.crash("health", "check", f"{when}: health check failed: {e.code().name} {e.details()}", b"")
                return
            if status != health_pb2.HealthCheckResponse.SERVING:
                self.crash("health", "check", f"{when}: service {service!r} is {status}", b"")
                return
        outcome = call_execute(self.stub, messages_for(sentinel_document()), timeout=self.timeout)
        if outcome.code != "OK":
            self.crash("known values", "check", f"{when}: {outcome.code}: {outcome.details}", b"")
            return
        got = sentinel_values(outcome.values)
        if not all(torch.equal(a, b) for a, b in zip(got, self.baseline, strict=True)):
            self.crash("known values", "check", f"{when}: the known request returns different values", b"")
            return
        self.report.checks += 1


@contextlib.contextmanager
def memory_cap(headroom_gb: float | None) -> Iterator[None]:
    """Cap this process's address space at its current size plus `headroom_gb`, for the duration."""
    if not headroom_gb:
        yield
        return
    with open("/proc/self/status", encoding="ascii") as f:
        vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_kb * 1024 + int(headroom_gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """One intra-op thread: a tiny model's matmuls only contend (and spin) on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(count: int, seed: int, *, grpc_count: int | None = None, spec: Any = None, check_every: int = 500,
        timeout: float = 60.0, memory_headroom_gb: float | None = 3.0, crash_dir: Path | None = None,
        log: Callable[[str], None] | None = None) -> Report:
    """Fuzz a fresh in-process server for `spec` (default: a tiny Llama built in a temporary folder)."""
    from farscope.server.config import ModelSpec
    from farscope.server.loading import load_model
    from farscope.server.replica import Replica
    from farscope.server.service import start_server

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    started = time.monotonic()
    grpc_count = max(1, count // 8) if grpc_count is None else grpc_count
    report = Report(seed=seed, count=count)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_torch_threads(1))
        if spec is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="farscope-fuzz-")))
            spec = ModelSpec(name=MODEL, source=str(build_tiny_model(directory / "tiny-llama")), limits=fuzz_limits())
        loaded = load_model(spec)
        reference = reference_values(loaded.model, loaded.tokenizer)
        replica = Replica(loaded)
        server = start_server({spec.name: replica}, host="127.0.0.1", port=0)
        stack.callback(server.stop, 1.0)
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        stub, health = pb_grpc.FarscopeStub(channel), health_pb2_grpc.HealthStub(channel)
        first = call_execute(stub, messages_for(sentinel_document()), timeout=timeout)
        if first.code != "OK":
            raise RuntimeError(f"the known request fails before fuzzing: {first.code}: {first.details}")
        baseline = sentinel_values(first.values)
        if not all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(baseline, reference, strict=True)):
            raise RuntimeError("the server's values differ from the plain PyTorch reference")
        rng = random.Random(seed)
        fuzzer = _Fuzzer(replica, stub, health, baseline, report, rng=rng, stride=max(1, count // grpc_count),
                         check_every=check_every, timeout=timeout, log=log,
                         scheduler=server.engine.schedulers[spec.name])
        seeds = seed_documents(replica.module_paths)
        report.seeds = len(seeds)
        for document in seeds:  # the mutation corpus must hold real, runnable requests
            outcome = call_execute(stub, messages_for(document), timeout=timeout)
            if outcome.code == "OK":
                report.seeds_ok += 1
            else:
                log(f"warning: a seed document fails: {outcome.code}: {outcome.details}")

        n_structured, n_mutated = int(count * 0.4), int(count * 0.4)
        n_random = count - n_structured - n_mutated
        with memory_cap(memory_headroom_gb):
            phase = time.monotonic()
            _structured(fuzzer, n_structured, seed, sorted(replica.module_paths))
            report.phase_seconds["structured"] = time.monotonic() - phase
            log(f"structured + varied: {n_structured} in {report.phase_seconds['structured']:.1f} s")

            phase = time.monotonic()
            pool = seeds + fuzzer.accepted
            for _ in range(n_mutated):
                fuzzer.feed("mutated", mutate(rng, rng.choice(pool), pool))
            report.phase_seconds["mutated"] = time.monotonic() - phase
            log(f"mutated: {n_mutated} in {report.phase_seconds['mutated']:.1f} s")

            phase = time.monotonic()
            for _ in range(n_random):
                fuzzer.feed("random", random_bytes(rng))
            report.phase_seconds["random"] = time.monotonic() - phase
        fuzzer.check("at the end")
    report.elapsed = time.monotonic() - started
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if report.crashes and crash_dir is not None:
        crash_dir.mkdir(parents=True, exist_ok=True)
        for number, crash in enumerate(report.crashes):
            (crash_dir / f"{number:04d}-{crash.kind.replace(' ', '_')}.bin").write_bytes(crash.payload)
            (crash_dir / f"{number:04d}-{crash.kind.replace(' ', '_')}.txt").write_text(
                f"{crash.family}\n{crash.detail}\n", encoding="utf-8")
    return report


VARIANTS = 4  # seeded structural variants of each hypothesis document: hypothesis draws are slow (~10 ms)


def _structured(fuzzer: _Fuzzer, n: int, seed: int, paths: list[str]) -> None:
    """`n` payloads: hypothesis documents, each followed by up to VARIANTS seeded variants of it."""
    if n <= 0:
        return
    families = fuzzer.report.families
    start = families["structured"] + families["varied"]
    remaining = lambda: n - (families["structured"] + families["varied"] - start)  # noqa: E731
    documents: list[Any] = []

    def feed(family: str, document: Any) -> None:
        try:
            data = codec.encode(document)
        except (TypeError, ValueError, OverflowError) as e:  # only if a strategy makes an unsendable value
            fuzzer.report.verdicts[f"unencodable: {type(e).__name__}"] += 1
            data = msgpack.packb(repr(document)[:200])  # still a payload: keep the count exact
        fuzzer.feed(family, data[:MAX_PAYLOAD])

    @hypothesis_seed(seed)
    @settings(max_examples=max(1, math.ceil(n / (1 + VARIANTS))), database=None, deadline=None,
              phases=[Phase.generate], derandomize=False, suppress_health_check=list(HealthCheck))
    @given(document_strategy(paths))
    def drive(document: Any) -> None:
        if remaining() <= 0:
            return
        feed("structured", document)
        if len(documents) < 5000:
            documents.append(document)
        for _ in range(min(VARIANTS, remaining())):
            feed("varied", vary(fuzzer.rng, document))

    drive()
    while remaining() > 0:  # hypothesis may stop early (it stops on a space it has exhausted)
        feed("varied", vary(fuzzer.rng, fuzzer.rng.choice(documents) if documents else {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="payloads to generate (default 100000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grpc", type=int, default=None, help="at least this many go over gRPC (default count/8)")
    parser.add_argument("--check-every", type=int, default=500, help="health + known-values check every N calls")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-call deadline (seconds)")
    parser.add_argument("--memory-headroom-gb", type=float, default=3.0,
                        help="address-space cap above the size at start (0: no cap)")
    parser.add_argument("--crash-dir", type=Path, default=Path(tempfile.gettempdir()) / "farscope-fuzz-crashes")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run(args.count, args.seed, grpc_count=args.grpc, check_every=args.check_every, timeout=args.timeout,
                 memory_headroom_gb=args.memory_headroom_gb or None, crash_dir=args.crash_dir)
    print(report.format())
    if report.crashes:
        print(f"crashing payloads written to {args.crash_dir}")
    return 1 if report.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
