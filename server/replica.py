"""A replica: one loaded model on its device(s), and how a validated graph (or a job) runs on it.

The scheduler's worker calls `run(job)` / `run_many(jobs)`; they add what a job needs around a pass:
progress and log events, and the stop check (cancellation, `max_wall_seconds`) run at every hook.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
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

__all__ = ["Replica", "Results", "public_config"]

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
        # Hooking one of these switches every attention layer of the pass to eager (attention.py).
        probes = {id(p) for m in self.model.modules() for p in getattr(m, "_farscope_probs", ())}
        self.eager_modules = frozenset(path for path, m in self.model.named_modules() if id(m) in probes)

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
        """The model's config as JSON, as clients see it: no server paths (see `public_config`)."""
        return json.dumps(public_config(self.model.config.to_dict(), self.name), default=str, sort_keys=True)

    # -- jobs (what the scheduler's worker calls) ------------------------------------------------

    def run(self, job: Job) -> Results:
        def on_log(text: str) -> None:
            job.emit(Event("log", text=text))

        def on_progress(step: int, total: int) -> None:
            job.emit(Event("progress", step=step, total=total))
        return self.execute(job.payload, check_cancelled=_stopper([job], self.limits.max_wall_seconds),
                            on_log=on_log, on_progress=on_progress)

    def run_many(self, jobs: list[Job]) -> list[Results | Exception]:
        def stopper(indices: list[int]) -> Callable[[], None]:
            return _stopper([jobs[i] for i in indices], self.limits.max_wall_seconds)
        outcomes = self.execute_many([job.payload for job in jobs], stopper=stopper)
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
        return cobatch.batch_key(graph, lengths, self.eager_modules)

    # -- graphs --------------------------------------------------------------------------------

    def execute(self, graph: Graph, *, check_cancelled: Any = None, on_log: Any = None,
                on_progress: Any = None) -> Results:
        start = time.perf_counter()
        saved = self._run(graph, check_cancelled=check_cancelled, on_log=on_log, on_progress=on_progress)
        return self._results(graph, saved, time.perf_counter() - start)

    def execute_many(self, graphs: list[Graph], *,
                     stopper: Callable[[list[int]], Callable[[], None]] | None = None) -> list[Results | Exception]:
        """Run compatible graphs (equal batch keys) in one forward pass, each as if alone.

        A graph that leaves the shared pass (cobatch.py says when), or all of them if the pass itself
        fails, runs again alone, so only a culprit fails and every result equals its solo run.
        `stopper(indices)`: the cancel / wall-time check of a pass of those graphs (a fresh deadline
        for each pass, so a slow shared pass costs the others no time of their own).
        """
        def check(indices: list[int]) -> Callable[[], None] | None:
            return stopper(indices) if stopper is not None else None
        outcomes: list[Results | Exception | None] = [None] * len(graphs)
        alone: dict[int, str] = {}
        shared = self._shareable(graphs)
        for index in set(range(len(graphs))) - set(shared):
            alone[index] = "its rows would make the batch as long as the sequence"
        if len(shared) > 1:
            start = time.perf_counter()
            group = [graphs[i] for i in shared]
            merged, offsets = cobatch.merge(group)
            isolation = cobatch.SharedPass(group, offsets)
            try:
                saved = self._run(merged, check_cancelled=check(shared), shared=isolation)
            except Exception as e:
                # Expected when one graph is at fault (it fails alone below); otherwise a co-batching bug.
                log.warning("a shared pass of %d graphs failed (%s: %s); running each alone", len(group),
                            type(e).__name__, e)
                alone.update({i: "the shared pass failed" for i in shared})
            else:
                seconds = time.perf_counter() - start
                for position, (graph, part) in enumerate(zip(group, cobatch.split(saved, group, offsets),
                                                             strict=True)):
                    if position in isolation.evicted:
                        alone[shared[position]] = isolation.evicted[position]
                        continue
                    try:
                        outcomes[shared[position]] = self._results(graph, part, seconds)
                    except Exception as e:
                        outcomes[shared[position]] = e
        else:
            alone.update({i: "no other graph to share a pass with" for i in shared})
        for index in sorted(alone):
            if alone[index] != "the shared pass failed":  # that one is logged above
                log.info("graph %d of a shared pass runs again alone: %s", index, alone[index])
            try:
                outcomes[index] = self.execute(graphs[index], check_cancelled=check([index]))
            except Exception as error:
                outcomes[index] = error
        return outcomes  # type: ignore[return-value]  # every index is filled above

    def _shareable(self, graphs: list[Graph]) -> list[int]:
        """The graphs that share a pass: all, less the last ones while the batch would be as long as
        the sequence (values without a batch dimension, such as cache positions, are as long as the
        sequence: the batch must not be, or they could not be told apart from per-row values)."""
        counts = [sum(len(rows_of(self.tokenizer, v)) for v in g.segments[0].invokes) for g in graphs]
        length = len(rows_of(self.tokenizer, graphs[0].segments[0].invokes[0])[0])
        indices = list(range(len(graphs)))
        while len(indices) > 1 and sum(counts[i] for i in indices) == length:
            indices.pop()
        return indices

    def _run(self, graph: Graph, *, shared: cobatch.SharedPass | None = None, **callbacks: Any) -> dict[int, Any]:
        def batch_for(segment: Segment) -> Batch:
            return build_batch(self.model, self.tokenizer, segment.invokes, segment.mode,
                               max_tokens=self.limits.max_input_tokens)
        with self._lock:
            return Executor(self.model, graph, batch_for, max_tensor_bytes=self.limits.max_tensor_bytes,
                            shared=shared, **callbacks).run()

    def _results(self, graph: Graph, saved: dict[int, Any], seconds: float) -> Results:
        results = _encode(graph, saved)
        if results.nbytes > self.limits.max_saved_bytes:
            raise LimitError(f"saved values take {results.nbytes} bytes; the limit (max_saved_bytes) is "
                             f"{self.limits.max_saved_bytes}")
        results.run_seconds = seconds
        return results


# Values that name a place on the server's disk: absolute POSIX or Windows paths, home-relative ones
# and file URLs. (A hub id such as "org/model" is public and stays, except as `_name_or_path`.)
_SERVER_PATH = re.compile(r"(?:/|~|\\\\|[A-Za-z]:[\\/]|file:)")


def public_config(config: Any, name: str) -> Any:
    """A model config (a `to_dict()`), with every value that could show the server's filesystem (the
    `_name_or_path` of the config and of any nested config, any path-like string) replaced by the
    model's served `name`. Nested dicts and lists are walked."""
    def clean(key: str, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(key, v) for v in value]
        if isinstance(value, str) and (key.endswith("name_or_path") or _SERVER_PATH.match(value)):
            return name
        return value

    return clean("", config)


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
