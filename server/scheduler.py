"""The queue in front of one model replica: fair between users. No torch: it only decides order.

Each user has a FIFO of jobs; the worker takes the users in turn (round robin), so one user's hundred
queued jobs delay another user's one job by at most one job each.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any

from farscope.interventions.errors import CancelledError, FarscopeError

from .jobs import Event, Job

__all__ = ["Scheduler", "Event", "Job"]

log = logging.getLogger(__name__)


class Scheduler:
    """Per-user queues and one worker thread that owns the replica's device."""

    def __init__(self, name: str, run: Callable[[Job], Any], *,
                 run_many: Callable[[list[Job]], list[Any]] | None = None,
                 batch_key: Callable[[Job], Hashable | None] | None = None, max_batch: int = 16) -> None:
        """`run` runs one job; with `run_many` and `batch_key`, jobs with equal keys (from any users)
        are taken together, up to `max_batch`, and run as one (co-batching)."""
        self.name = name
        self._run = run
        self._run_many = run_many
        self._batch_key = batch_key
        self.max_batch = max_batch
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # users in turn order
        self._wake = threading.Condition()
        self._closed = False
        self.running: Job | None = None
        self._worker = threading.Thread(target=self._loop, name=f"farscope-worker-{name}", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise FarscopeError("the server is shutting down and accepts no new jobs")
            position = self._position(job.user)
            self._queues.setdefault(job.user, deque()).append(job)
            job.emit(Event("queued", position=position))
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Cancel a queued job now; a running one stops at its next hook or generation step."""
        job.cancelled.set()
        with self._wake:
            queue = self._queues.get(job.user)
            if queue is not None and job in queue:
                queue.remove(job)
                job.fail(CancelledError("the job was cancelled before it ran", job_id=job.id))

    @property
    def depth(self) -> int:
        with self._wake:
            return sum(len(q) for q in self._queues.values())

    def _position(self, user: str) -> int:
        """Jobs that will run before a new job of `user`, given round robin."""
        mine = len(self._queues.get(user, ()))
        return sum(min(len(q), mine + 1) for u, q in self._queues.items() if u != user) + mine

    def close(self, *, timeout: float = 30.0) -> None:
        """Stop taking jobs; fail the queued ones clearly; give the running one `timeout` seconds,
        then cancel it (it stops at its next hook or generation step)."""
        with self._wake:
            self._closed = True
            queued = [job for q in self._queues.values() for job in q]
            self._queues.clear()
            self._wake.notify_all()
        for job in queued:
            job.fail(CancelledError("the server shut down before this job ran; submit it again", job_id=job.id))
        self._worker.join(timeout=timeout)
        running = self.running
        if running is not None:
            running.cancelled.set()
            self._worker.join(timeout=30)

    def _next(self) -> Job | None:
        with self._wake:
            while True:
                for user in list(self._queues):
                    queue = self._queues.pop(user)  # re-inserted last: the next user goes first
                    job = queue.popleft()
                    if queue:
                        self._queues[user] = queue
                    return job
                if self._closed:
                    return None
                self._wake.wait()

    def _key(self, job: Job) -> Hashable | None:
        if not hasattr(job, "batch_key"):
            try:
                job.batch_key = self._batch_key(job) if self._batch_key else None
            except Exception:
                job.batch_key = None
        return job.batch_key

    def _companions(self, first: Job) -> list[Job]:
        """Queued jobs that can share `first`'s forward pass: queue heads with its key, users in turn."""
        key = self._key(first) if self._run_many is not None else None
        if key is None:
            return []
        taken: list[Job] = []
        with self._wake:
            progress = True
            while progress and len(taken) + 1 < self.max_batch:
                progress = False
                for user in list(self._queues):
                    queue = self._queues[user]
                    if queue and not queue[0].cancelled.is_set() and self._key(queue[0]) == key:
                        taken.append(queue.popleft())
                        if not queue:
                            del self._queues[user]
                        progress = True
                        if len(taken) + 1 >= self.max_batch:
                            break
        return taken

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            if job.cancelled.is_set():
                job.fail(CancelledError("the job was cancelled before it ran", job_id=job.id))
                continue
            jobs = [job, *self._companions(job)]
            self.running = job
            for each in jobs:
                each.emit(Event("running"))
            try:
                if len(jobs) == 1:
                    outcomes = [self._run(job)]
                else:
                    log.info("co-batching %d jobs on %s", len(jobs), self.name)
                    outcomes = self._run_many(jobs)
            except Exception as e:  # the jobs fail; the worker keeps serving
                outcomes = [e] * len(jobs)
            finally:
                self.running = None
            for each, outcome in zip(jobs, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    log.info("job %s failed: %s", each.id, outcome)
                    each.fail(outcome)
                else:
                    each.finish(outcome)
