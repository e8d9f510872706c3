"""Jobs: what a submitted request becomes, and where it stays after its client has gone.

A job's events (queued, running, progress, log, done / error) form an append-only log: any number of
watchers, from any connection, replay it from the start and then follow it live. After it finishes,
a job and its results stay in the `JobStore` for a time-to-live, so a client that disconnected or
crashed fetches them by job id from a new process. No torch here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from farscope.interventions.errors import FarscopeError

__all__ = ["Event", "Job", "JobStore", "TERMINAL"]

TERMINAL = ("done", "error")


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
    error: BaseException | None = None


@dataclass
class Job:
    model: str
    payload: Any  # what the replica runs (a validated graph)
    user: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: Any = None  # the encoded results, once done
    error: BaseException | None = None
    finished: float | None = None
    _events: list[Event] = field(default_factory=list, repr=False)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def state(self) -> str:
        with self._changed:
            kinds = [e.kind for e in self._events if e.kind in ("queued", "running", "done", "error")]
        return kinds[-1] if kinds else "new"

    def emit(self, event: Event) -> None:
        with self._changed:
            if self._events and self._events[-1].kind in TERMINAL:
                return  # a finished job's log is final
            if event.kind == "error":
                self.error = event.error
            if event.kind in TERMINAL:
                self.finished = time.monotonic()
            self._events.append(event)
            self._changed.notify_all()

    def finish(self, result: Any) -> None:
        self.result = result
        self.emit(Event("done"))

    def fail(self, error: BaseException) -> None:
        self.emit(Event("error", error=error))

    def follow(self, start: int = 0, *, timeout: float | None = None) -> Iterator[Event]:
        """Events from index `start` on, waiting for new ones, until the job finishes."""
        index = start
        while True:
            with self._changed:
                while index >= len(self._events):
                    if not self._changed.wait(timeout):
                        return
                event = self._events[index]
            index += 1
            yield event
            if event.kind in TERMINAL:
                return


class JobNotFoundError(FarscopeError):
    pass


class JobStore:
    """Jobs by id; finished ones are forgotten `ttl` seconds after they finish, or sooner (oldest
    first) once their results together hold more than `max_result_bytes` of memory."""

    def __init__(self, ttl: float = 3600.0, max_result_bytes: int = 4 * 2**30) -> None:
        self.ttl = ttl
        self.max_result_bytes = max_result_bytes
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._sweep()
            self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._sweep()
            return self._jobs.get(job_id)

    def active(self, user: str) -> int:
        """How many of `user`'s jobs are queued or running."""
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.user == user and j.finished is None)

    def unfinished(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.finished is None]

    def _sweep(self) -> None:
        now = time.monotonic()
        expired = [i for i, j in self._jobs.items() if j.finished is not None and now - j.finished > self.ttl]
        for job_id in expired:
            del self._jobs[job_id]
        finished = sorted((j for j in self._jobs.values() if j.finished is not None and j.result is not None),
                          key=lambda j: j.finished)
        held = sum(j.result.nbytes for j in finished)
        for job in finished:
            if held <= self.max_result_bytes:
                break
            held -= job.result.nbytes
            del self._jobs[job.id]
