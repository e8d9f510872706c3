"""The queue in front of one model replica: fair between users. No torch: it only decides order.

Each user has a FIFO of jobs; the worker takes the users in turn (round robin), so one user's hundred
queued jobs delay another user's one job by at most one job each. The worker thread is the only one
that runs model work for its replica; it hands jobs to the replica (`Runner`) and never dies of a job:
whatever a pass raises fails that pass's jobs, is logged, and the next job runs.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Any, Protocol

from farscope.interventions.errors import CancelledError, FarscopeError, TransportError

from .jobs import Event, Job

__all__ = ["Runner", "Scheduler"]

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What a scheduler drives: a replica, or anything shaped like one."""

    name: str

    def run(self, job: Job) -> Any:
        """Run one job; returns its results (emitting progress and log events on the job)."""

    def run_many(self, jobs: list[Job]) -> list[Any]:
        """Run jobs with equal batch keys in one pass; each one's results or exception, in order."""

    def batch_key(self, job: Job) -> Hashable | None:
        """What `job` may share a pass with (jobs with equal keys), or None: it runs alone."""


class Scheduler:
    """Per-user queues and one worker thread that owns the replica's device."""

    def __init__(self, replica: Runner, *, cobatch: bool = True, max_batch: int = 16) -> None:
        """With `cobatch`, queued jobs with equal batch keys (from any users) are taken together, up to
        `max_batch`, and run as one pass."""
        self.name = replica.name
        self.replica = replica
        self.cobatch = cobatch
        self.max_batch = max_batch
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # users in turn order; never empty deques
        self._keys: dict[str, Hashable | None] = {}  # batch keys by job id, computed once per queued job
        self._wake = threading.Condition()
        self._closed = False
        self.running: tuple[Job, ...] = ()
        self._worker = threading.Thread(target=self._loop, name=f"farscope-worker-{self.name}", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise TransportError("the server is shutting down and accepts no new jobs")
            position = self._position(job.user)
            self._queues.setdefault(job.user, deque()).append(job)
            job.emit(Event("queued", position=position))
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Cancel a queued job now; a running one stops at its next hook or generation step."""
        job.cancelled.set()
        self.withdraw(job)

    def withdraw(self, job: Job) -> bool:
        """Cancel `job` if it is still queued (True); a job already taken to run is left alone."""
        with self._wake:
            queue = self._queues.get(job.user)
            if queue is None or job not in queue:
                return False
            queue.remove(job)
            if not queue:  # an empty deque left here once killed the worker (pop from an empty deque)
                del self._queues[job.user]
            self._keys.pop(job.id, None)
            job.cancelled.set()
        job.fail(CancelledError("the job was cancelled before it ran", job_id=job.id))
        return True

    @property
    def depth(self) -> int:
        with self._wake:
            return sum(len(q) for q in self._queues.values())

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def _position(self, user: str) -> int:
        """Jobs that will run before a new job of `user`, given round robin."""
        mine = len(self._queues.get(user, ()))
        return sum(min(len(q), mine + 1) for u, q in self._queues.items() if u != user) + mine

    def close(self, *, timeout: float = 30.0) -> None:
        """Stop taking jobs; fail the queued ones clearly; give the running ones `timeout` seconds,
        then cancel them (they stop at their next hook or generation step)."""
        with self._wake:
            self._closed = True
            queued = [job for q in self._queues.values() for job in q]
            self._queues.clear()
            self._keys.clear()
            self._wake.notify_all()
        for job in queued:
            job.fail(CancelledError("the server shut down before this job ran; submit it again", job_id=job.id))
        self._worker.join(timeout=timeout)
        for job in self.running:
            job.cancelled.set()
        self._worker.join(timeout=30)

    def _next(self) -> list[Job] | None:
        """The next pass's jobs: the next user's first job and, co-batching, its companions."""
        with self._wake:
            while True:
                while self._queues:
                    user, queue = self._queues.popitem(last=False)
                    if not queue:
                        continue
                    job = queue.popleft()
                    if queue:
                        self._queues[user] = queue  # re-inserted last: the next user goes first
                    return [job, *self._companions(job)]
                if self._closed:
                    return None
                self._wake.wait()

    def _key(self, job: Job) -> Hashable | None:
        if job.id not in self._keys:
            try:
                self._keys[job.id] = self.replica.batch_key(job)
            except Exception:
                log.exception("job %s: its batch key could not be computed; it runs alone", job.id)
                self._keys[job.id] = None
        return self._keys[job.id]

    def _companions(self, first: Job) -> list[Job]:
        """Queued jobs that can share `first`'s pass: queue heads with its key, users in turn.
        Called with the lock held."""
        key = self._key(first) if self.cobatch else None
        self._keys.pop(first.id, None)
        if key is None:
            return []
        taken: list[Job] = []
        progress = True
        while progress and len(taken) + 1 < self.max_batch:
            progress = False
            for user in list(self._queues):
                queue = self._queues[user]
                if queue[0].cancelled.is_set() or self._key(queue[0]) != key:
                    continue
                taken.append(queue.popleft())
                self._keys.pop(taken[-1].id, None)
                if not queue:
                    del self._queues[user]
                progress = True
                if len(taken) + 1 >= self.max_batch:
                    break
        return taken

    def _loop(self) -> None:
        while True:
            try:
                jobs = self._next()
            except Exception:  # a bug in choosing; the queues stay consistent, so keep serving
                log.exception("scheduler %s: choosing the next job failed", self.name)
                continue
            if jobs is None:
                return
            try:
                self._serve(jobs)
            except Exception as e:
                log.exception("scheduler %s: a pass failed outside its jobs' own errors", self.name)
                for job in jobs:
                    job.fail(e)  # no-op for the jobs that already finished
            finally:
                self.running = ()

    def _serve(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.cancelled.is_set()]
        for job in jobs:
            if job.cancelled.is_set():
                job.fail(CancelledError("the job was cancelled before it ran", job_id=job.id))
        if not live:
            return
        self.running = tuple(live)
        for job in live:
            job.emit(Event("running"))
        if len(live) == 1:
            try:
                outcomes: list[Any] = [self.replica.run(live[0])]
            except Exception as e:  # the job fails; the worker keeps serving
                outcomes = [e]
        else:
            log.info("co-batching %d jobs on %s", len(live), self.name)
            outcomes = self.replica.run_many(live)
        for job, outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.info("job %s failed: %s", job.id, outcome if isinstance(outcome, FarscopeError) else
                         type(outcome).__name__)
                job.fail(outcome)
            else:
                job.finish(outcome)
