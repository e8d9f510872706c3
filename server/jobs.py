"""Jobs: what a submitted request becomes, and where it stays after its client has gone.

A job's events (queued, running, progress, log, done / error) form an append-only log: any number of
watchers, from any connection, replay it from the start and then follow it live. Watchers on an event
loop wait without a thread (`Job.watch`); listeners (`Job.subscribe`) are called on the thread that
emitted each event. After it finishes, a job and its results stay in the `JobStore` for a time-to-live,
so a client that disconnected or crashed fetches them by job id from a new process. No torch here.

A finished job keeps only what a client can still ask for: its events and its results, or its error's
message. It lets go of its request (the validated graph and its tensor constants) and of its error's
traceback and chain, whose frames would keep the failed pass's intermediate tensors alive; the store
counts every byte a job holds (`Job.nbytes`) against its bound.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from farscope.interventions.errors import FarscopeError, LimitError

__all__ = ["DEFAULT_JOB_TTL", "MAX_HELD_BYTES", "MAX_RESULT_BYTES", "Event", "Job", "JobStore", "TERMINAL"]

log = logging.getLogger(__name__)

TERMINAL = ("done", "error")
DEFAULT_JOB_TTL = 3600.0  # seconds a finished job stays fetchable by id
MAX_HELD_BYTES = 4 * 2**30  # what the store's jobs hold at once; finished ones go, oldest first, past it
MAX_RESULT_BYTES = MAX_HELD_BYTES  # its earlier name, when it counted results only


@dataclass(frozen=True)
class Event:
    """Something that happened to a job.

    kind: queued (position) | running | progress (step of total) | log (text) | done | error.
    """

    kind: str
    position: int = 0
    step: int = 0
    total: int = 0
    text: str = ""
    error: FarscopeError | None = None


Listener = Callable[["Job", Event], None]


@dataclass(eq=False)
class Job:
    model: str
    payload: Any  # what the replica runs (a validated graph); None once the job has finished
    user: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: Any = None  # the encoded results, once done
    error: FarscopeError | None = None
    finished: float | None = None
    _events: list[Event] = field(default_factory=list, repr=False)
    _listeners: list[Listener] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _payload_bytes: int = field(default=0, repr=False)
    _text_bytes: int = field(default=0, repr=False)  # of its events' texts, kept as they are emitted

    def __post_init__(self) -> None:
        self._payload_bytes = _held_bytes(self.payload)

    @property
    def nbytes(self) -> int:
        """The memory this job holds: its request until it finishes, its results, events and error text."""
        with self._lock:
            events = self._text_bytes
            error = len(str(self.error)) if self.error is not None else 0
        payload = self._payload_bytes if self.payload is not None else 0
        results = self.result.nbytes if self.result is not None else 0
        return payload + results + events + error

    @property
    def state(self) -> str:
        with self._lock:
            kinds = [e.kind for e in self._events if e.kind in ("queued", "running", "done", "error")]
        return kinds[-1] if kinds else "new"

    @property
    def position(self) -> int:
        """Jobs that were ahead of this one when it was queued."""
        return next((e.position for e in self.events() if e.kind == "queued"), 0)

    def events(self, start: int = 0) -> list[Event]:
        """The events so far, from index `start`."""
        with self._lock:
            return self._events[start:]

    def emit(self, event: Event) -> None:
        with self._lock:
            if self._events and self._events[-1].kind in TERMINAL:
                return  # a finished job's log is final
            if event.kind in TERMINAL:
                self.error = event.error
                self.finished = time.monotonic()
                # The request is spent: the graph and its constant tensors go now, not at the TTL. (The
                # worker running it, if still running after a cancel, holds its own reference.)
                self.payload = None
            self._events.append(event)
            self._text_bytes += len(event.text)
            listeners = list(self._listeners)
        if event.kind in TERMINAL:
            self._done.set()
        for listener in listeners:  # outside the lock: a listener may read the job
            try:
                listener(self, event)
            except Exception:  # a listener's bug must not stop the worker that emitted
                log.exception("job %s: a listener failed on its %s event", self.id, event.kind)

    def finish(self, result: Any) -> None:
        if self.finished is None:  # a job cancelled meanwhile keeps its error, and holds no results
            self.result = result
        self.emit(Event("done"))

    def fail(self, error: BaseException) -> None:
        """End the job with `error`; anything but a FarscopeError is a bug of ours, logged and reported
        as an internal error."""
        if not isinstance(error, FarscopeError):
            # The traceback as text: a log record holding the exception (exc_info) would keep its frames.
            log.error("job %s: internal error\n%s", self.id, "".join(traceback.format_exception(error)).rstrip())
            internal = FarscopeError(f"internal server error: {type(error).__name__}: {error}")
            _release(error)
            error = internal
        elif error.job_id not in (None, self.id):
            _release(error)
            error = copy.copy(error)  # one exception shared by the jobs of a failed shared pass
        _release(error)
        error.job_id = self.id
        self.emit(Event("error", error=error))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finishes (True) or `timeout` seconds pass (False)."""
        return self._done.wait(timeout)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(job, event)` on every event from now on; returns the way to unsubscribe."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        return unsubscribe

    async def watch(self) -> AsyncIterator[Event]:
        """Every event, replayed from the start then live, until the job finishes. Waiting holds no
        thread: the emitting thread wakes this loop through `call_soon_threadsafe`."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake(job: Job, event: Event) -> None:
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass
        unsubscribe = self.subscribe(wake)
        try:
            index = 0
            while True:
                changed.clear()
                new = self.events(index)  # read after clear(): an event emitted now still wakes us
                for event in new:
                    yield event
                    if event.kind in TERMINAL:
                        return
                index += len(new)
                if not new:
                    await changed.wait()
        finally:
            unsubscribe()


def _release(error: BaseException) -> None:
    """Let go of what an error keeps beyond its message: its traceback (whose frames hold the failed
    pass's locals: the executor, its values, the model's intermediate tensors) and its chain (the
    `from` cause and the context, with their tracebacks). Called once it has been logged."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        following = current.__cause__ or current.__context__
        current.__traceback__ = None
        current.__cause__ = None
        current.__context__ = None
        current = following


def _held_bytes(payload: Any) -> int:
    """The bytes of a request's constants (tensors, strings) in a graph's nodes and inputs: what a job
    holds until it has run. Duck-typed (``nbytes``), so this module stays free of torch."""
    parts: list[Any] = []
    for node in getattr(payload, "nodes", ()):
        parts.extend((node.args, node.kwargs))
    for segment in getattr(payload, "segments", ()):
        parts.append(segment.invokes)
    total, stack = 0, parts
    while stack:
        value = stack.pop()
        if isinstance(value, (str, bytes)):
            total += len(value)
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(getattr(value, "nbytes", None), int):
            total += value.nbytes
    return total


class JobStore:
    """Jobs by id; finished ones are forgotten `ttl` seconds after they finish, or sooner (oldest
    first) once the jobs together hold more than `max_bytes` of memory (`Job.nbytes`: results,
    events, errors, and the requests of jobs not yet finished, which are counted but never dropped)."""

    def __init__(self, ttl: float = DEFAULT_JOB_TTL, max_bytes: int = MAX_HELD_BYTES) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def add(self, job: Job, *, max_active: int | None = None) -> None:
        """Keep `job`; with `max_active`, refuse it (LimitError) if its user already has that many
        jobs queued or running (checked and added in one step, so racing submits cannot both pass)."""
        with self._lock:
            self._sweep()
            if max_active is not None:
                active = sum(1 for j in self._jobs.values() if j.user == job.user and j.finished is None)
                if active >= max_active:
                    raise LimitError(f"API key {job.user!r} already has {max_active} jobs queued or running "
                                     "(its max_concurrent quota); retry when one finishes")
            self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._sweep()
            return self._jobs.get(job_id)

    def _sweep(self) -> None:
        now = time.monotonic()
        expired = [i for i, j in self._jobs.items() if j.finished is not None and now - j.finished > self.ttl]
        for job_id in expired:
            del self._jobs[job_id]
        sizes = {job_id: job.nbytes for job_id, job in self._jobs.items()}
        held = sum(sizes.values())
        if held <= self.max_bytes:
            return
        finished = sorted((j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.finished)
        for job in finished:
            if held <= self.max_bytes:
                break
            held -= sizes[job.id]
            del self._jobs[job.id]
