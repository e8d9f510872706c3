"""A replica: one loaded model on its device(s), and how a validated graph runs on it."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from farscope.interventions import codec
from farscope.interventions.errors import RemoteError
from farscope.interventions.graph import Graph, Segment

from .attention import instrument
from .executor import Batch, Executor
from .inputs import build_batch
from .loading import LoadedModel

__all__ = ["Replica", "Results"]


@dataclass
class Results:
    """Saved values encoded for the wire: the document and each tensor's raw bytes."""

    document: bytes
    blobs: list[memoryview]
    run_seconds: float

    @property
    def nbytes(self) -> int:
        return len(self.document) + sum(b.nbytes for b in self.blobs)


class Replica:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.name = loaded.spec.name
        self.model = loaded.model
        # Gradients are taken with respect to activations only: weights never accumulate `.grad`,
        # which would be state shared between users.
        self.model.requires_grad_(False)
        instrument(self.model)
        self.tokenizer = loaded.tokenizer
        self.limits = loaded.spec.limits
        self.modules = [(path, type(m).__name__) for path, m in self.model.named_modules()]
        self.module_paths = frozenset(path for path, _ in self.modules)
        self.tokenizer_sha256 = _files_digest(loaded.tokenizer_files)
        self._lock = threading.Lock()

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def config_json(self) -> str:
        return json.dumps(self.model.config.to_dict(), default=str, sort_keys=True)

    def execute(self, graph: Graph, *, check_cancelled: Any = None, on_log: Any = None,
                on_progress: Any = None) -> Results:
        start = time.perf_counter()
        with self._lock:
            def batch_for(segment: Segment) -> Batch:
                return build_batch(self.model, self.tokenizer, segment.invokes, segment.mode)
            saved = Executor(self.model, graph, batch_for, check_cancelled=check_cancelled, on_log=on_log,
                             on_progress=on_progress, max_tensor_bytes=self.limits.max_saved_bytes).run()
        results = _encode(graph, saved)
        if results.nbytes > self.limits.max_saved_bytes:
            from farscope.interventions.errors import LimitError

            raise LimitError(f"saved values take {results.nbytes} bytes; the limit (max_saved_bytes) is "
                             f"{self.limits.max_saved_bytes}")
        results.run_seconds = time.perf_counter() - start
        return results


def _encode(graph: Graph, saved: dict[int, Any]) -> Results:
    try:
        document, blobs = codec.encode_results(saved)
    except TypeError:
        for nid, value in saved.items():  # find the culprit, to name it
            try:
                codec.encode_results(value)
            except TypeError as e:
                node = graph.nodes[nid]
                raise RemoteError(f"saved value cannot be sent back: {e}", node=node.format(),
                                  node_id=nid, where=node.where) from None
        raise
    return Results(document, blobs, 0.0)


def _files_digest(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()
