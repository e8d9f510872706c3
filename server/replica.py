"""A replica: one loaded model on its device(s), and how a validated graph (or a job) runs on it.

The scheduler's worker calls `run(job)` / `run_many(jobs)`; they add what a job needs around a pass:
progress and log events, and the stop check (cancellation, `max_wall_seconds`) run at every hook.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from farscope.interventions import codec
from farscope.interventions.errors import CancelledError, LimitError, RemoteError
from farscope.interventions.graph import Graph, Segment

from . import cobatch
from .attention import instrument
from .executor import Batch, Executor
from .inputs import build_batch, rows_of
from .jobs import Event, Job
from .loading import LoadedModel

__all__ = ["Replica", "Results"]

log = logging.getLogger(__name__)


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
        instrument(self.model, max_bytes=loaded.spec.limits.max_tensor_bytes)
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

    # -- jobs (what the scheduler's worker calls) ------------------------------------------------

    def run(self, job: Job) -> Results:
        def on_log(text: str) -> None:
            job.emit(Event("log", text=text))

        def on_progress(step: int, total: int) -> None:
            job.emit(Event("progress", step=step, total=total))
        return self.execute(job.payload, check_cancelled=_stopper([job], self.limits.max_wall_seconds),
                            on_log=on_log, on_progress=on_progress)

    def run_many(self, jobs: list[Job]) -> list[Results | Exception]:
        outcomes = self.execute_many([job.payload for job in jobs],
                                     check_cancelled=_stopper(jobs, self.limits.max_wall_seconds))
        return [CancelledError("the job was cancelled") if job.cancelled.is_set() else outcome
                for job, outcome in zip(jobs, outcomes, strict=True)]

    def batch_key(self, job: Job) -> Hashable | None:
        """What `job` may share a forward pass with (see cobatch.py), or None."""
        graph: Graph = job.payload
        segment = graph.segments[0]
        if len(graph.segments) != 1 or segment.mode != "trace":
            return None
        try:
            lengths = [len(row) for value in segment.invokes for row in rows_of(self.tokenizer, value)]
        except Exception as e:  # malformed inputs fail properly when the graph runs alone
            log.warning("job %s runs alone: its inputs could not be measured (%s: %s)", job.id,
                        type(e).__name__, e)
            return None
        return cobatch.batch_key(graph, lengths)

    # -- graphs --------------------------------------------------------------------------------

    def execute(self, graph: Graph, *, check_cancelled: Any = None, on_log: Any = None,
                on_progress: Any = None) -> Results:
        start = time.perf_counter()
        saved = self._run(graph, check_cancelled=check_cancelled, on_log=on_log, on_progress=on_progress)
        return self._results(graph, saved, time.perf_counter() - start)

    def execute_many(self, graphs: list[Graph], *, check_cancelled: Any = None) -> list[Results | Exception]:
        """Run compatible graphs in one forward pass; if that fails, each alone (so only the culprit fails)."""
        start = time.perf_counter()
        merged, offsets = cobatch.merge(graphs)
        try:
            saved = self._run(merged, check_cancelled=check_cancelled)
        except Exception as e:
            # Expected when one graph is at fault (it fails alone below); otherwise a co-batching bug.
            log.warning("a shared pass of %d graphs failed (%s: %s); running each alone", len(graphs),
                        type(e).__name__, e)
            outcomes: list[Results | Exception] = []
            for graph in graphs:
                try:
                    outcomes.append(self.execute(graph, check_cancelled=check_cancelled))
                except Exception as error:
                    outcomes.append(error)
            return outcomes
        seconds = time.perf_counter() - start
        outcomes = []
        for graph, part in zip(graphs, cobatch.split(saved, graphs, offsets), strict=True):
            try:
                outcomes.append(self._results(graph, part, seconds))
            except Exception as e:
                outcomes.append(e)
        return outcomes

    def _run(self, graph: Graph, **callbacks: Any) -> dict[int, Any]:
        def batch_for(segment: Segment) -> Batch:
            return build_batch(self.model, self.tokenizer, segment.invokes, segment.mode,
                               max_tokens=self.limits.max_input_tokens)
        with self._lock:
            return Executor(self.model, graph, batch_for, max_tensor_bytes=self.limits.max_tensor_bytes,
                            **callbacks).run()

    def _results(self, graph: Graph, saved: dict[int, Any], seconds: float) -> Results:
        results = _encode(graph, saved)
        if results.nbytes > self.limits.max_saved_bytes:
            raise LimitError(f"saved values take {results.nbytes} bytes; the limit (max_saved_bytes) is "
                             f"{self.limits.max_saved_bytes}")
        results.run_seconds = seconds
        return results


def _stopper(jobs: list[Job], limit: float) -> Callable[[], None]:
    """The check run at every hook: a pass stops at its next module once all its jobs are cancelled
    (a shared pass serves the others on) or once it has run longer than `limit` seconds."""
    deadline = time.monotonic() + limit

    def check() -> None:
        if all(job.cancelled.is_set() for job in jobs):
            raise CancelledError("the job was cancelled")
        if time.monotonic() > deadline:
            raise LimitError(f"the job ran longer than max_wall_seconds={limit:g}")
    return check


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
