"""Jobs and the queue in front of one model replica. No torch here: the scheduler only decides order."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Job", "Event", "Scheduler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """Something that happened to a job: kind is queued | running | log | done | error."""

    kind: str
    position: int = 0
    result: Any = None
    error: BaseException | None = None


@dataclass
class Job:
    model: str
    payload: Any  # what the replica runs (a validated graph)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)

    def emit(self, event: Event) -> None:
        self._events.put(event)

    def events(self) -> Iterator[Event]:
        """Events in order, ending with done or error."""
        while True:
            event = self._events.get()
            yield event
            if event.kind in ("done", "error"):
                return


class Scheduler:
    """A FIFO queue and one worker thread that owns the replica's device."""

    def __init__(self, name: str, run: Callable[[Job], Any]) -> None:
        self.name = name
        self._run = run
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._ahead = itertools.count()
        self._worker = threading.Thread(target=self._loop, name=f"farscope-worker-{name}", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> None:
        job.emit(Event("queued", position=self._queue.qsize()))
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():
                continue
            job.emit(Event("running"))
            try:
                result = self._run(job)
            except Exception as e:  # the job fails; the worker keeps serving
                log.info("job %s failed: %s", job.id, e)
                job.emit(Event("error", error=e))
            else:
                job.emit(Event("done", result=result))
